"""The read-only status page served at ``/`` on ``daemon.metrics_address``: one server-rendered
HTML document built from the ``status`` control command's dict, the recent failures and the
loop lag. Pure function, no I/O: the HTTP server owns the request, this module only the text.

Everything on the page that a job, a plugin or the config produced (names, schedules, errors,
reload errors, the config path) is untrusted text: it goes through :func:`_e` and nothing
else. The document also carries a Content-Security-Policy that allows no script and no
resource at all (inline style only), so a missed escape still could not run anything. No
forms, no script: the page reloads itself with a meta refresh and a plain link.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from taskd.cli.fmt import NONE, duration, local_time, one_line, relative

__all__ = ["CSP", "render"]

CSP = "default-src 'none'; style-src 'unsafe-inline'"
ERROR_CELL = 200  # characters of an error shown in the jobs table; the tooltip has more
ERROR_FULL = 4000  # characters of an error shown at all, so a huge traceback stays bounded
BAD_OUTCOMES = frozenset({"failed", "timed_out", "interrupted"})
_Add = Callable[[str], None]  # appends a piece of the document

_STYLE = """
:root{color-scheme:light dark;--fg:#1d2127;--mute:#5d6672;--bg:#fff;--alt:#f5f7f9;--line:#dde2e7;
--ok:#11703a;--okbg:#e3f4e9;--bad:#b3261e;--badbg:#fde7e5;--warn:#8a5300;--warnbg:#fff1d6;
--run:#0b57b0;--runbg:#e3eefc;--idle:#5d6672;--idlebg:#eef0f2}
@media (prefers-color-scheme:dark){:root{--fg:#e4e7eb;--mute:#9aa4b0;--bg:#15181c;--alt:#1c2025;
--line:#2e343b;--ok:#6fd39a;--okbg:#16321f;--bad:#ff8a80;--badbg:#3d1a18;--warn:#f3c26b;
--warnbg:#3a2c10;--run:#8ab8ff;--runbg:#15294a;--idle:#9aa4b0;--idlebg:#252a30}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header,main,footer{padding:12px 24px}
header{border-bottom:1px solid var(--line);background:var(--alt)}
h1{font-size:20px;margin:0 8px 6px 0;display:inline-block}
h2{font-size:16px;margin:20px 0 8px}
a{color:var(--run)}
nav{display:inline-block;font-size:13px}
nav a{margin-right:12px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0 0}
dt{color:var(--mute)}
dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:5px 8px;border-bottom:1px solid var(--line)}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute);
position:sticky;top:0;background:var(--bg)}
tbody tr:nth-child(even){background:var(--alt)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.name{font-weight:600;overflow-wrap:anywhere}
.mono,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.mute{color:var(--mute)}
.err{color:var(--bad);white-space:pre-wrap;overflow-wrap:anywhere;margin-top:2px}
.b{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600}
.ok{color:var(--ok);background:var(--okbg)}
.bad{color:var(--bad);background:var(--badbg)}
.warn{color:var(--warn);background:var(--warnbg)}
.run{color:var(--run);background:var(--runbg)}
.idle{color:var(--idle);background:var(--idlebg)}
tr.flag-bad td:first-child{box-shadow:inset 3px 0 var(--bad)}
tr.flag-warn td:first-child{box-shadow:inset 3px 0 var(--warn)}
.name .mute{font-weight:400;font-size:12px}
footer{color:var(--mute);font-size:12px;border-top:1px solid var(--line);margin-top:16px}
"""
# One CSS class per job state, so the colour says at a glance what the word says.
_STATE_CLASS = {
    "idle": "idle",
    "running": "run",
    "paused": "warn",
    "retiring": "idle",
    "broken": "bad",
    "crashed": "bad",
}


def render(
    status: dict[str, Any],
    *,
    failures: list[dict[str, Any]],
    lag: dict[str, float],
    refresh: float = 5.0,
    now: float | None = None,
) -> str:
    """The whole HTML5 document, with relative times as seen from ``now`` (default: now).

    ``status`` is what the ``status`` control command answers (``{"daemon": {...}, "jobs":
    [...]}``); ``failures`` the newest failed runs (``job, run_id, outcome, started, duration,
    error``); ``lag`` the event loop's lag in seconds under ``last``, ``max`` and
    ``threshold`` (a missing key shows as ``-``). The page reloads itself every ``refresh``
    seconds. Raises ValueError when ``refresh`` is not a positive number."""
    if not (math.isfinite(refresh) and refresh > 0):
        raise ValueError(f"refresh must be a positive number of seconds, not {refresh!r}")
    now = time.time() if now is None else now
    daemon: Mapping[str, Any] = status.get("daemon") or {}
    jobs: Sequence[Mapping[str, Any]] = status.get("jobs") or []
    out: list[str] = []
    add = out.append
    add(
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        f'<meta http-equiv="refresh" content="{refresh:g}">\n'
        '<meta name="viewport" content="width=device-width,initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>taskd {_e(daemon.get('version', ''))}: {_title_status(daemon, jobs)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n"
    )
    _header(add, daemon, jobs, failures, lag, now)
    add("<main>\n")
    _jobs_table(add, jobs, now)
    _failures_table(add, failures, now)
    add("</main>\n")
    add(
        f"<footer>Generated {_e(local_time(now))} by taskd {_e(daemon.get('version', ''))}"
        f" · reloads every {refresh:g}s · "
        '<a href="">Reload now</a> · read only: change things with the taskd command'
        "</footer>\n</body>\n</html>\n"
    )
    return "".join(out)


# -- parts -------------------------------------------------------------------------------------


def _header(
    add: _Add,
    daemon: Mapping[str, Any],
    jobs: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]],
    lag: Mapping[str, float],
    now: float,
) -> None:
    health, cls = _health(daemon)
    add(
        f"<header>\n<h1>taskd {_e(daemon.get('version', '?'))}</h1> "
        f'<span class="b {cls}">{_e(health)}</span>\n'
        f'<nav><a href="#jobs">Jobs ({len(jobs)})</a>'
        f'<a href="#failures">Recent failures ({len(failures)})</a>'
        '<a href="">Reload now</a></nav>\n<dl>\n'
    )
    started = daemon.get("started")
    _fact(
        add,
        "daemon",
        f"pid {_e(daemon.get('pid', '?'))} · up {_e(duration(daemon.get('uptime')))}"
        f' <span class="mute">(since {_e(local_time(started))})</span>'
        f" · loop {_e(daemon.get('loop', '?'))}",
    )
    _fact(add, "config", f'<span class="mono">{_e(daemon.get("config", NONE))}</span>')
    counts = [f"{len(jobs)} jobs", f"{daemon.get('running', 0)} running"]
    for key, cls in (("paused", "warn"), ("broken", "bad"), ("stuck_threads", "bad")):
        n = daemon.get(key) or 0
        label = f"{n} {key.replace('_', ' ')}"
        counts.append(f'<span class="b {cls}">{_e(label)}</span>' if n else _e(label))
    _fact(add, "jobs", " · ".join(counts))
    _fact(add, "last reload", _reload(daemon.get("last_reload"), now))
    _fact(add, "loop lag", _lag(lag))
    add("</dl>\n</header>\n")


def _health(daemon: Mapping[str, Any]) -> tuple[str, str]:
    """One word for the daemon, worst first."""
    if daemon.get("stopping"):
        return "stopping", "warn"
    reload_ = daemon.get("last_reload")
    if reload_ is not None and not reload_.get("ok"):
        return "last reload failed", "bad"
    if daemon.get("state_write_failing"):
        return "state writes failing", "bad"
    if (daemon.get("threads") or {}).get("exhausted"):
        return "thread pool exhausted", "bad"
    if daemon.get("stuck_threads"):
        return "stuck threads", "bad"
    return "running", "ok"


def _title_status(daemon: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> str:
    # The tab title: how many jobs need a look, readable in a row of tabs.
    bad = sum(
        1
        for j in jobs
        if j.get("state") in ("broken", "crashed")
        or (j.get("last") or {}).get("outcome") in BAD_OUTCOMES
    )
    return _e(f"{bad} failing" if bad else _health(daemon)[0])


def _reload(last: Mapping[str, Any] | None, now: float) -> str:
    if last is None:
        return '<span class="mute">none since start</span>'
    at = last.get("at")
    when = f"{_e(relative(at, now))} ({_e(local_time(at))}), took {_e(duration(last.get('took')))}"
    if last.get("ok"):
        changes = [f"{len(last.get(key) or ())} {key}" for key in ("added", "changed", "removed")]
        text = f'<span class="b ok">ok</span> {when} · {_e(", ".join(changes))}'
    else:
        text = f'<span class="b bad">failed</span> {when}; the previous config keeps running'
    for err in last.get("errors") or ():
        text += f'<div class="err mono">{_e(_cut(err, ERROR_FULL))}</div>'
    for warning in last.get("warnings") or ():
        text += f'<div class="mono" style="color:var(--warn)">{_e(_cut(warning, ERROR_FULL))}</div>'
    return text


def _lag(lag: Mapping[str, float]) -> str:
    last, worst, threshold = (lag.get(k) for k in ("last", "max", "threshold"))
    text = f"last {_e(duration(last))} · max {_e(duration(worst))}"
    if threshold is None:
        return text
    text += f' <span class="mute">(threshold {_e(duration(threshold))})</span>'
    if last is not None and last > threshold:
        text += ' <span class="b bad">loop blocked</span>'
    elif worst is not None and worst > threshold:
        text += ' <span class="b warn">was blocked</span>'
    return text


def _jobs_table(add: _Add, jobs: Sequence[Mapping[str, Any]], now: float) -> None:
    add(
        '<h2 id="jobs">Jobs</h2>\n<table>\n<thead><tr><th>Job</th><th>State</th><th>Schedule</th>'
        '<th>Last run</th><th>Next run</th><th class="num">Failures</th></tr></thead>\n<tbody>\n'
    )
    if not jobs:
        add('<tr><td colspan="6" class="mute">No jobs configured.</td></tr>\n')
    for job in jobs:
        state = str(job.get("state", "?"))
        last = job.get("last")
        streak = job.get("failures") or 0
        bad = state in ("broken", "crashed") or (
            last is not None and last.get("outcome") in BAD_OUTCOMES
        )
        row_cls = "flag-bad" if bad else "flag-warn" if state == "paused" else ""
        next_ = job.get("next")
        add(
            f'<tr class="{row_cls}" id="job-{_e(job.get("name", ""))}">'
            f'<td class="name">{_e(job.get("name", "?"))}'
            f'<div class="mute">{_e(job.get("type", ""))}</div></td>'
            f"<td>{_state(state, job, now)}</td>"
            f'<td class="mono">{_e(job.get("schedule", NONE))}</td>'
            f"<td>{_last_run(last, now)}</td>"
            f'<td title="{_e(local_time(next_))}">{_e(relative(next_, now))}</td>'
            f'<td class="num">{_streak(streak)}</td></tr>\n'
        )
    add("</tbody>\n</table>\n")


def _state(state: str, job: Mapping[str, Any], now: float) -> str:
    text = f'<span class="b {_STATE_CLASS.get(state, "idle")}">{_e(state)}</span>'
    if state == "broken" and job.get("broken"):
        text += f'<div class="err">{_e(_cut(str(job["broken"]), ERROR_FULL))}</div>'
    elif state == "crashed":
        text += '<div class="err">its scheduling task ended by a bug; restart taskd</div>'
    for run in job.get("running") or ():
        attempt = run.get("attempt") or 1
        extra = f", attempt {attempt}" if attempt > 1 else ""
        if run.get("in_backoff"):
            extra += ", waiting to retry"
        text += (
            f'<div class="mute">for {_e(duration(run.get("for")))}'
            f" ({_e(run.get('cause', '?'))}{_e(extra)})</div>"
        )
    if job.get("queued"):
        text += f'<div class="mute">{_e(job["queued"])} queued</div>'
    return text


def _last_run(last: Mapping[str, Any] | None, now: float) -> str:
    if last is None:
        return '<span class="mute">never run</span>'
    outcome = str(last.get("outcome", "?"))
    cls = "ok" if outcome == "succeeded" else "bad" if outcome in BAD_OUTCOMES else "idle"
    started = last.get("started")
    text = (
        f'<span class="b {cls}">{_e(outcome.replace("_", " "))}</span> '
        f'<span title="{_e(local_time(started))} · run {_e(last.get("run_id", ""))}">'
        f"{_e(relative(started, now))}</span>"
        f' <span class="mute">in {_e(duration(last.get("duration")))}</span>'
    )
    error = last.get("error")
    if error:
        # The cell shows the start on one line; the tooltip the rest, within reason.
        text += (
            f'<div class="err" title="{_e(_cut(error, ERROR_FULL))}">'
            f"{_e(one_line(error, ERROR_CELL))}</div>"
        )
    return text


def _streak(n: int) -> str:
    return f'<span class="b bad">{int(n)}</span>' if n else "0"


def _failures_table(add: _Add, failures: Sequence[Mapping[str, Any]], now: float) -> None:
    add('<h2 id="failures">Recent failures</h2>\n')
    if not failures:
        add('<p class="mute">No failed runs since taskd started.</p>\n')
        return
    add(
        "<table>\n<thead><tr><th>When</th><th>Job</th><th>Outcome</th><th>Run</th>"
        '<th class="num">Duration</th><th>Error</th></tr></thead>\n<tbody>\n'
    )
    # Newest first whatever order the caller kept them in (the daemon's ring is oldest first).
    for f in sorted(failures, key=lambda f: f.get("started") or 0.0, reverse=True):
        started = f.get("started")
        add(
            f'<tr><td title="{_e(local_time(started))}">{_e(relative(started, now))}</td>'
            f'<td class="name"><a href="#job-{_e(f.get("job", ""))}">{_e(f.get("job", "?"))}</a></td>'
            f'<td><span class="b bad">{_e(str(f.get("outcome", "?")).replace("_", " "))}</span></td>'
            f'<td class="mono">{_e(f.get("run_id", ""))}</td>'
            f'<td class="num">{_e(duration(f.get("duration")))}</td>'
            f'<td class="err mono">{_e(_cut(f.get("error") or "", ERROR_FULL))}</td></tr>\n'
        )
    add("</tbody>\n</table>\n")


# -- helpers -----------------------------------------------------------------------------------


def _fact(add: _Add, term: str, value_html: str) -> None:
    add(f"<dt>{_e(term)}</dt><dd>{value_html}</dd>\n")


def _e(value: Any) -> str:
    """The only way text reaches the page: escaped for element content and quoted attributes."""
    return html.escape(str(value), quote=True)


def _cut(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
