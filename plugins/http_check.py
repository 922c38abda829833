"""Bundled taskd plugin: ``http_check``, probe many URLs at once with aiohttp.

A drop-in file: the daemon loads it by path. The job is ``kind="io"``: aiohttp is an
asyncio-native client, so every probe is a coroutine on the daemon's loop, all of them started
together with ``asyncio.gather`` under a semaphore (``concurrency``), none of them a thread.

The ``aiohttp.ClientSession`` (its connection pool, DNS cache and TLS context) is the job's
long-lived resource (``ctx.resource``): opened by the first run, reused by the next ones, and
closed by taskd when a reload changes or removes the job and when the daemon stops, so no
connection outlives the job that opened it.

Each URL's outcome (ok, status, latency, error, since when, failures in a row) goes into the
shared state under ``http_check/<job>``, written in one section under the state's lock; the
run's result is a bounded summary, and the run fails when more than ``max_failures`` URLs fail.
"""

import asyncio
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Literal, Required, TypedDict

import aiohttp

import taskd

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class URLCheck(TypedDict, total=False):
    """One entry of ``urls`` as a table; a key left out takes the job-level option's value."""

    url: Required[str]
    method: Method
    timeout: timedelta
    status: int | list[int]
    contains: str
    regex: str
    headers: dict[str, str]
    follow_redirects: bool


# A URL's error in the state and the result is cut to this many characters.
_MAX_ERROR = 300
# How many failures the run's error message names before "... and N more".
_NAMED_IN_ERROR = 10
_READ_CHUNK = 64 * 1024
_SCHEMES = ("http://", "https://")


class HTTPCheckFailed(RuntimeError):
    """More URLs failed than ``max_failures`` allows; ``failures`` has each one's outcome."""

    def __init__(self, message: str, failures: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.failures = failures

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.failures))


class _Check:
    """One URL's check with the job-level defaults filled in, validated."""

    __slots__ = (
        "contains",
        "follow_redirects",
        "headers",
        "key",
        "method",
        "regex",
        "shown",
        "statuses",
        "timeout",
        "url",
    )

    def __init__(self, where: str, entry: dict[str, Any], defaults: dict[str, Any]) -> None:
        merged = {**defaults, **entry}
        self.url: str = merged["url"]
        # What the state, the result and the messages show: the URL, its password masked.
        self.shown = _mask_password(self.url)
        if not self.url.startswith(_SCHEMES) or len(self.url) <= len("https://"):
            raise ValueError(
                f"http_check: {where}: {self.shown!r} is not an http:// or https:// URL"
            )
        self.method: str = merged["method"]
        timeout: timedelta = merged["timeout"]
        self.timeout = timeout.total_seconds()
        if self.timeout <= 0:
            raise ValueError(f"http_check: {where}: timeout must be more than 0, got {timeout}")
        status = merged["status"]
        statuses = [status] if isinstance(status, int) else status
        if statuses is not None:
            bad = [s for s in statuses if not 100 <= s <= 599]
            if bad or not statuses:
                raise ValueError(
                    f"http_check: {where}: status must be HTTP codes 100-599, got {status!r}"
                )
        self.statuses: frozenset[int] | None = frozenset(statuses) if statuses is not None else None
        self.contains: str | None = merged["contains"]
        self.regex: re.Pattern[str] | None = None
        if merged["regex"] is not None:
            try:
                self.regex = re.compile(merged["regex"])
            except re.error as exc:
                raise ValueError(
                    f"http_check: {where}: regex {merged['regex']!r} is not valid: {exc}"
                ) from None
        self.headers: dict[str, str] = {
            **(defaults["headers"] or {}),
            **(entry.get("headers") or {}),
        }
        if self.method == "HEAD" and (self.contains is not None or self.regex is not None):
            raise ValueError(
                f"http_check: {where}: contains and regex check a body, and a HEAD answer "
                f"has none; use GET"
            )
        self.follow_redirects: bool = merged["follow_redirects"]
        # The state's key: the URL shown, with the method when it is not a plain GET.
        self.key = self.shown if self.method == "GET" else f"{self.method} {self.shown}"

    def expected(self) -> str:
        if self.statuses is None:
            return "2xx"
        return " or ".join(str(s) for s in sorted(self.statuses))


def _mask_password(url: str) -> str:
    """``url`` with the password of its userinfo (``user:password@``) replaced by ``***``:
    aiohttp sends it as basic auth, and it must not reach the state, history or log."""
    scheme, sep, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}{rest[end:]}"


def _cut(text: str, limit: int = _MAX_ERROR) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ssl_context(verify_tls: bool, ca_file: str | None) -> ssl.SSLContext | bool:
    """aiohttp's ``ssl`` argument: False skips verification; otherwise the system's CAs plus
    ``ca_file``'s (a private CA's certificates can be added without losing the public ones)."""
    if not verify_tls:
        return False
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"http_check: option 'ca_file' {ca_file!r} cannot be used: {exc}; give a "
                f"PEM file of CA certificates readable by taskd"
            ) from None
    return context


@asynccontextmanager
async def _session(
    ctx: taskd.JobContext, concurrency: int, verify_tls: bool, ca_file: str | None
) -> AsyncIterator[aiohttp.ClientSession]:
    # Loading CA files reads and parses a few hundred KB: in the thread pool, off the loop.
    context = await ctx.to_thread(_ssl_context, verify_tls, ca_file)
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    headers = {"User-Agent": f"taskd-http_check/{taskd.__version__}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        yield session


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether there was more (not read)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(min(_READ_CHUNK, limit - size))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), not resp.content.at_eof()


def _judge(check: _Check, status: int, body: bytes, charset: str | None, cut: bool) -> str | None:
    """What is wrong with an answer, or None."""
    ok_status = 200 <= status <= 299 if check.statuses is None else status in check.statuses
    if not ok_status:
        return f"status {status}, expected {check.expected()}"
    if check.contains is None and check.regex is None:
        return None
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    read = f" (in the first {len(body)} bytes read)" if cut else ""
    if check.contains is not None and check.contains not in text:
        return f"body does not contain {check.contains!r}{read}"
    if check.regex is not None and check.regex.search(text) is None:
        return f"body does not match regex {check.regex.pattern!r}{read}"
    return None


def _error_text(exc: BaseException, check: _Check) -> str:
    """One line saying what went wrong, in the operator's terms."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {check.timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"TLS certificate not trusted: {exc.certificate_error}; set option 'ca_file' to "
            f"the CA that signed it"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, socket.gaierror):
        # A resolver's errno (EAI_*) is not an OS errno: os.strerror reads "Unknown error -2".
        reason = exc.os_error.strerror or str(exc.os_error)
        return f"cannot resolve host {exc.host}: {reason}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        # asyncio's "Connect call failed ('127.0.0.1', 80)" puts the address where the
        # reason goes; the errno says it in words.
        reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without an answer"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return f"too many redirects (more than {len(exc.history)})"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"connection failed: {exc.strerror or exc}"
    if isinstance(exc, aiohttp.InvalidURL):  # its text is the URL, a password included
        why = exc.description if isinstance(exc.description, str) else None
        return "not a valid URL" + (f": {why}" if why else "")
    if isinstance(exc, UnicodeError):  # yarl's IDNA encoding: a label over 63 characters
        return f"the host name cannot be encoded (IDNA): {exc}"
    if isinstance(exc, ValueError):  # a header aiohttp refuses (a newline in its value)
        return f"the request cannot be sent: {exc}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


async def _probe(
    session: aiohttp.ClientSession, limit: asyncio.Semaphore, check: _Check, max_body: int
) -> dict[str, Any]:
    async with limit:
        start = time.perf_counter()
        status: int | None = None
        try:
            async with session.request(
                check.method,
                check.url,
                headers=check.headers,
                allow_redirects=check.follow_redirects,
                timeout=aiohttp.ClientTimeout(total=check.timeout),
            ) as resp:
                status = resp.status
                # Read (a bounded part of) the body even when nothing checks it: a response
                # read to its end leaves the connection reusable by the next probe.
                body, cut = (
                    (b"", False) if check.method == "HEAD" else await _read_body(resp, max_body)
                )
                error = _judge(check, status, body, resp.charset, cut)
        # ValueError: what aiohttp refuses to send (a host name IDNA cannot encode, a header
        # with a newline) is this URL's failure, not the whole run's.
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = _error_text(exc, check).replace(check.url, check.shown)
        latency = round(time.perf_counter() - start, 4)
    return {
        "url": check.key,
        "ok": error is None,
        "status": status,
        "latency": latency,
        "error": _cut(error) if error is not None else None,
    }


async def _record(ctx: taskd.JobContext, outcomes: list[dict[str, Any]]) -> None:
    """Each URL's outcome into the shared state, in one section under its lock. Only the URLs
    of this run are kept, so the entry is bounded by the job's own list."""
    key = f"http_check/{ctx.job}"
    now = round(time.time(), 3)
    async with ctx.state.locked() as state:
        before = state.get(key)
        before = before if isinstance(before, dict) else {}
        entry: dict[str, Any] = {}
        for o in outcomes:
            prev = before.get(o["url"])
            prev = prev if isinstance(prev, dict) else {}
            changed = prev.get("ok") is not o["ok"]
            entry[o["url"]] = {
                "ok": o["ok"],
                "status": o["status"],
                "latency": o["latency"],
                "error": o["error"],
                "checked": now,
                "since": now if changed or "since" not in prev else prev["since"],
                "fails": 0 if o["ok"] else int(prev.get("fails", 0) or 0) + 1,
            }
        state[key] = entry


async def http_check(
    ctx: taskd.JobContext,
    urls: list[str | URLCheck],
    method: Method = "GET",
    timeout: timedelta = timedelta(seconds=10),
    status: int | list[int] | None = None,
    contains: str | None = None,
    regex: str | None = None,
    headers: dict[str, str] | None = None,
    follow_redirects: bool = True,
    concurrency: int = 20,
    max_failures: int = 0,
    verify_tls: bool = True,
    ca_file: str | None = None,
    max_body: int = 1024 * 1024,
    list_limit: int = 20,
) -> dict[str, Any]:
    """Probe URLs concurrently (aiohttp); fail when more than max_failures fail.

    Options:
      urls: the URLs, each a string or a table with ``url`` and any of method, timeout,
        status, contains, regex, headers, follow_redirects (overriding the options below).
      method: the HTTP method (default GET).
      timeout: per URL, connecting and reading included (default "10s").
      status: the expected status code or codes (default: any 2xx), after redirects.
      contains: text the body must contain; regex: a pattern it must match (re.search).
      headers: request headers (a URL's own are added over these).
      follow_redirects: follow 3xx answers (default true); false checks the 3xx itself.
      concurrency: most URLs probed at once, and most connections open (default 20).
      max_failures: how many URLs may fail before the run does (default 0).
      verify_tls: check certificates (default true); ca_file: a PEM file of CA certificates
        trusted besides the system's.
      max_body: bytes of a body read at most (default 1 MiB); the rest is not read.
      list_limit: failures listed in the result (default 20).

    Returns the counts, the run's wall time, the slowest URL and the failures (at most
    list_limit); every URL's outcome is in the shared state under ``http_check/<job>``.
    """
    if not urls:
        raise ValueError("http_check: option 'urls' is empty; list at least one URL")
    for name, value in (("concurrency", concurrency), ("max_body", max_body)):
        if value < 1:
            raise ValueError(f"http_check: option {name!r} must be at least 1, got {value}")
    for name, value in (("max_failures", max_failures), ("list_limit", list_limit)):
        if value < 0:
            raise ValueError(f"http_check: option {name!r} must be 0 or more, got {value}")
    defaults = {
        "method": method,
        "timeout": timeout,
        "status": status,
        "contains": contains,
        "regex": regex,
        "headers": headers,
        "follow_redirects": follow_redirects,
    }
    checks: list[_Check] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(urls):
        entry: dict[str, Any] = {"url": item} if isinstance(item, str) else dict(item)
        check = _Check(f"urls[{i}]", entry, defaults)
        if check.key in seen:
            raise ValueError(
                f"http_check: urls[{i}]: {check.key!r} is listed twice (also urls[{seen[check.key]}])"
            )
        seen[check.key] = i
        checks.append(check)

    session = await ctx.resource("session", lambda: _session(ctx, concurrency, verify_tls, ca_file))
    limit = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(_probe(session, limit, c, max_body) for c in checks))
    seconds = round(time.perf_counter() - start, 4)
    await _record(ctx, outcomes)

    failures = [o for o in outcomes if not o["ok"]]
    slowest = max(outcomes, key=lambda o: o["latency"])
    result: dict[str, Any] = {
        "urls": len(outcomes),
        "ok": len(outcomes) - len(failures),
        "failed": len(failures),
        "seconds": seconds,
        "slowest": {"url": _cut(slowest["url"]), "latency": slowest["latency"]},
        "failures": [{**f, "url": _cut(f["url"])} for f in failures[:list_limit]],
    }
    if len(failures) > list_limit:
        result["failures_not_listed"] = len(failures) - list_limit
    ctx.log.debug("http_check done", urls=len(outcomes), failed=len(failures), seconds=seconds)
    if len(failures) > max_failures:
        named = "; ".join(
            f"{_cut(f['url'], 100)}: {f['error']}" for f in failures[:_NAMED_IN_ERROR]
        )
        more = len(failures) - _NAMED_IN_ERROR
        tail = f"; ... and {more} more" if more > 0 else ""
        raise HTTPCheckFailed(
            f"http_check: {len(failures)} of {len(outcomes)} URLs failed "
            f"(max_failures {max_failures}): {named}{tail}",
            result["failures"],
        )
    return result


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [taskd.JobType("http_check", http_check, kind="io")]
