"""Bundled taskd plugin: ``notify_webhook``, POST a JSON payload when a job finally fails,
times out, or recovers. A plugin of the event hooks only: it offers no job type.

Configured by environment variables, read when the plugin loads (see ``SETTINGS``). The
webhook's URL is a secret (whoever has a Slack or Teams webhook URL can post to the channel),
so it belongs beside the service, in a file only root reads (systemd's ``EnvironmentFile=``),
rather than in taskd.toml. Without ``TASKD_WEBHOOK_URL`` the plugin does nothing. A variable
that is wrong, or a ``TASKD_WEBHOOK_*`` name it does not know, makes the plugin fail to load
with the reason: ``taskd check`` reports it, and the daemon logs it and runs on without it.

- Sent: a run's final failure (its retries spent), a time-out, and the first success after
  failures that were notified ("recovered"). Retried attempts are not sent.
- De-duplicated: a job failing again with the same error is not sent again until
  ``TASKD_WEBHOOK_REPEAT`` has passed; a new error is sent. Rate-limited: at most one POST
  per job per ``TASKD_WEBHOOK_MIN_INTERVAL`` and ``TASKD_WEBHOOK_MAX_PER_MINUTE`` in all.
  What is held back is counted, and the next payload for that job says how many.
- Never in the way: the POST runs in a hook task of its own (the run and the loop go on),
  bounded by ``TASKD_WEBHOOK_TIMEOUT``; when the daemon stops, POSTs in flight get at most
  ``STOP_GRACE`` more seconds. A webhook that fails or hangs is logged (``webhook_failed``).
"""

import asyncio
import difflib
import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

import taskd
from taskd.config.durations import parse_duration

log = structlog.get_logger("taskd.plugins.notify_webhook")

PREFIX = "TASKD_WEBHOOK_"
# name -> (default, meaning); the README's table is this one.
SETTINGS: dict[str, tuple[str, str]] = {
    "URL": ("", "where to POST (http:// or https://); unset: the plugin does nothing"),
    "FORMAT": (
        "json",
        "json (the full payload, with a Slack-compatible text) or slack (only text)",
    ),
    "EVENTS": ("failed,timed_out,recovered", "which to send"),
    "TIMEOUT": ("5s", "a POST's limit, connecting included (at most 60s)"),
    "REPEAT": ("1h", "the same job failing with the same error is sent again after this"),
    "MIN_INTERVAL": ("1m", "at most one POST per job in this time (recoveries excepted)"),
    "MAX_PER_MINUTE": ("30", "at most this many POSTs a minute in all"),
}
EVENTS = ("failed", "timed_out", "recovered")
STOP_GRACE = 2.0  # seconds a POST in flight may still take once the daemon stops
MAX_ERROR = 1000  # characters of a run's error in a payload


class SettingsError(ValueError):
    """A TASKD_WEBHOOK_* variable is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class Settings:
    url: str | None = None
    slack_only: bool = False
    events: frozenset[str] = frozenset(EVENTS)
    timeout: float = 5.0
    repeat: float = 3600.0
    min_interval: float = 60.0
    max_per_minute: int = 30


def _duration(name: str, text: str, low: float, high: float) -> float:
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name}={text!r}: {exc}") from None
    if not low <= seconds <= high:
        raise SettingsError(f"{PREFIX}{name}={text!r}: must be from {low:g}s to {high:g}s")
    return seconds


def read_settings(env: dict[str, str] | os._Environ[str]) -> Settings:
    """The settings from ``env``; raises SettingsError naming the variable."""
    for key in env:
        if key.startswith(PREFIX) and key[len(PREFIX) :] not in SETTINGS:
            close = difflib.get_close_matches(key, [PREFIX + k for k in SETTINGS], n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {PREFIX}{', '.join(SETTINGS)}"
            raise SettingsError(f"unknown variable {key} ({hint})")

    def get(name: str) -> str:
        return env.get(PREFIX + name, SETTINGS[name][0]).strip()

    url = get("URL") or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise SettingsError(f"{PREFIX}URL must start with http:// or https://, got {url[:40]!r}")
    fmt = get("FORMAT")
    if fmt not in ("json", "slack"):
        raise SettingsError(f"{PREFIX}FORMAT must be json or slack, got {fmt!r}")
    events = frozenset(e.strip() for e in get("EVENTS").split(",") if e.strip())
    unknown = sorted(events - set(EVENTS))
    if unknown or not events:
        raise SettingsError(
            f"{PREFIX}EVENTS={get('EVENTS')!r}: give a comma-separated list of "
            f"{', '.join(EVENTS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    try:
        per_minute = int(get("MAX_PER_MINUTE"))
    except ValueError:
        per_minute = -1
    if not 1 <= per_minute <= 10_000:
        raise SettingsError(
            f"{PREFIX}MAX_PER_MINUTE must be a whole number from 1 to 10000, "
            f"got {get('MAX_PER_MINUTE')!r}"
        )
    return Settings(
        url=url,
        slack_only=fmt == "slack",
        events=events,
        timeout=_duration("TIMEOUT", get("TIMEOUT"), 0.1, 60.0),
        repeat=_duration("REPEAT", get("REPEAT"), 0.0, 30 * 86400.0),
        min_interval=_duration("MIN_INTERVAL", get("MIN_INTERVAL"), 0.0, 86400.0),
        max_per_minute=per_minute,
    )


@dataclass
class _JobState:
    streak: int = 0  # failed or timed-out runs in a row
    first_failed: float = 0.0
    notified: bool = False  # a failure of this streak was sent
    last_sent: float = float("-inf")
    last_key: tuple[str, str | None] | None = None
    held: int = 0  # failures not sent since the last POST for this job


@dataclass
class Policy:
    """Which events become POSTs: pure bookkeeping, no I/O (``now`` is monotonic seconds)."""

    settings: Settings
    host: str = field(default_factory=socket.gethostname)
    jobs: dict[str, _JobState] = field(default_factory=dict)
    sent: deque[float] = field(default_factory=deque)  # times of the POSTs of the last minute
    dropped: int = 0  # held back by MAX_PER_MINUTE, in all

    def decide(self, event: taskd.JobEvent, now: float) -> dict[str, Any] | None:
        kind = str(event.kind)
        if kind == "succeeded":
            state = self.jobs.pop(event.job, None)
            if state is None or not state.notified or "recovered" not in self.settings.events:
                return None
            # A recovery is always sent: a failure that was reported must be seen to end.
            return self._payload("recovered", event, state, now)
        if kind not in ("failed", "timed_out"):
            return None
        state = self.jobs.setdefault(event.job, _JobState())
        if state.streak == 0:
            state.first_failed = now
        state.streak += 1
        if kind not in self.settings.events:
            return None
        key = (kind, event.error)
        repeated = state.notified and key == state.last_key
        if (repeated and now - state.last_sent < self.settings.repeat) or (
            now - state.last_sent < self.settings.min_interval
        ):
            state.held += 1
            return None
        while self.sent and now - self.sent[0] >= 60.0:
            self.sent.popleft()
        if len(self.sent) >= self.settings.max_per_minute:
            state.held += 1
            self.dropped += 1
            log.warning("webhook_rate_limited", job=event.job, max_per_minute=len(self.sent))
            return None
        payload = self._payload(kind, event, state, now)
        state.notified, state.last_key, state.last_sent, state.held = True, key, now, 0
        return payload

    def _payload(
        self, kind: str, event: taskd.JobEvent, state: _JobState, now: float
    ) -> dict[str, Any]:
        self.sent.append(now)
        error = (
            event.error
            if event.error is None or len(event.error) <= MAX_ERROR
            else (event.error[: MAX_ERROR - 1] + "…")
        )
        where = f"taskd on {self.host}: job {event.job}"
        if kind == "recovered":
            down = now - state.first_failed
            text = f"{where} recovered after {state.streak} failed run(s) in {down:.0f}s"
        elif kind == "timed_out":
            text = f"{where} timed out after {event.duration or 0:.1f}s"
        else:
            text = f"{where} failed: {error}"
        if kind != "recovered" and state.streak > 1:
            text += f" ({state.streak} failures in a row)"
        if state.held:
            text += f"; {state.held} more not sent (rate limit or repeat)"
        if self.settings.slack_only:
            return {"text": text}
        return {
            "text": text,
            "event": kind,
            "job": event.job,
            "host": self.host,
            "run_id": event.run_id,
            "attempt": event.attempt,
            "scheduled": event.scheduled.isoformat(),
            "at": event.at,
            "duration": event.duration,
            "error": error,
            "failures": state.streak,
            "not_sent": state.held,
        }


def _where(url: str) -> str:
    """``scheme://host[:port]/…``: where a URL points without its path, query or userinfo
    (a webhook's secret is in its path: Slack's, Teams', Discord's)."""
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    return f"{scheme}{sep}{host}/…"


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL, and its part after the host, replaced by :func:`_where`."""
    after_host = url[len(_where(url)) - 2 :]  # "/path?query", what _where leaves out
    text = text.replace(url, _where(url))
    return text.replace(after_host, "/…") if len(after_host) > 1 else text


def _error_text(exc: BaseException, url: str) -> str:
    """One line for an aiohttp or socket error, never with the URL's secret part: aiohttp
    prints the whole URL in its response errors (``url='...'``) and invalid-URL errors."""
    if isinstance(exc, aiohttp.ClientResponseError):
        text = f"status {exc.status}, {exc.message}"
    elif isinstance(exc, aiohttp.InvalidURL):
        reason = exc.description if isinstance(exc.description, str) else None
        text = f"{_where(url)} cannot be used" + (f": {reason}" if reason else "")
    else:
        text = str(exc)
    return f"{type(exc).__name__}: {' '.join(_scrub(text, url).split())}"


class Notifier:
    """The policy and the POSTs in flight, with their deadlines (cut short at a stop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = Policy(settings)
        self.deadlines: set[asyncio.Timeout] = set()
        self.stopping = False

    async def on_event(self, event: taskd.JobEvent) -> None:
        # Decided before the first await: events are handled in the order they came.
        payload = self.policy.decide(event, time.monotonic())
        if payload is None or self.settings.url is None:
            return
        await self.post(event.job, payload)

    async def post(self, job: str, payload: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        limit = (
            self.settings.timeout if not self.stopping else min(STOP_GRACE, self.settings.timeout)
        )
        deadline = asyncio.timeout(limit)
        started = loop.time()
        url = str(self.settings.url)
        self.deadlines.add(deadline)
        try:
            # A session per POST: a notifier sends rarely, and a connection kept open for
            # hours between failures would mostly be found closed by the far end.
            async with (
                deadline,
                aiohttp.ClientSession() as session,
                # Redirects are not followed: a POST sent on after a 301 or 302 becomes a GET
                # without the payload, and the webhook's 200 to that would read as sent.
                session.post(
                    url,
                    data=json.dumps(payload),
                    headers={"Content-Type": "application/json"},
                    allow_redirects=False,
                ) as resp,
            ):
                body = (await resp.content.read(500)).decode("utf-8", "replace")
                if 300 <= resp.status <= 399:
                    moved = resp.headers.get("Location", "")
                    log.warning(
                        "webhook_failed",
                        job=job,
                        status=resp.status,
                        location=_where(moved if "://" in moved else url),
                        hint=f"the webhook moved; set {PREFIX}URL to its new address "
                        f"(a redirect is not followed: the POST would lose its payload)",
                    )
                    return
                if resp.status >= 300:
                    log.warning("webhook_failed", job=job, status=resp.status, answer=body[:200])
                    return
            log.debug("webhook_sent", job=job, kind=payload.get("event"))
        except TimeoutError:
            log.warning(
                "webhook_failed",
                job=job,
                error=f"no answer within {loop.time() - started:.1f}s",
                hint=f"the webhook hung; {PREFIX}TIMEOUT bounds each POST",
            )
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("webhook_failed", job=job, error=_error_text(exc, url))
        finally:
            self.deadlines.discard(deadline)

    def stop_soon(self) -> None:
        """The daemon stops: POSTs in flight, and those still to come, get STOP_GRACE at most."""
        self.stopping = True
        cut = asyncio.get_running_loop().time() + STOP_GRACE
        for deadline in self.deadlines:
            when = deadline.when()
            if when is None or when > cut:
                deadline.reschedule(cut)


# Read at load: a wrong variable fails the load, so `taskd check` and the log name it.
_notifier = Notifier(read_settings(os.environ))


@taskd.hookimpl
def taskd_daemon_started(info: dict[str, Any]) -> None:
    s = _notifier.settings
    if s.url is None:
        log.info("webhook_off", hint=f"set {PREFIX}URL in the daemon's environment to send")
    else:
        log.info(
            "webhook_on",
            events=sorted(s.events),
            format="slack" if s.slack_only else "json",
            timeout=s.timeout,
        )


@taskd.hookimpl
async def taskd_job_event(event: taskd.JobEvent) -> None:
    await _notifier.on_event(event)


@taskd.hookimpl
def taskd_daemon_stopping(info: dict[str, Any]) -> None:
    _notifier.stop_soon()


@taskd.hookimpl
def taskd_config_reloaded(added: list[str], changed: list[str], removed: list[str]) -> None:
    for job in removed:  # its streak ends with it; the table stays bounded by the jobs
        _notifier.policy.jobs.pop(job, None)
