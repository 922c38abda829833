"""Bounded config parsing (issue 8, item 8): hostile TOML shapes given to the real `taskd check`,
to a daemon at start and to a running daemon on SIGHUP. Each must end promptly with the file
and the bound named, the daemon's memory must not keep what a rejected file cost, and a valid
file of an odd shape must still load."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskd.config.source import MAX_CONFIG_BYTES, MAX_DEPTH
from tests.helpers import DaemonProc, daemon_table, rss

pytestmark = pytest.mark.timeout(120)

# Generous for a loaded 2-core machine: a bounded parse ends in about a second; before the
# fix these shapes took 8 s and more (or a minute for the header one).
LIMIT = 20.0
MAX_RSS = 200 * 1024 * 1024  # the taskd process itself: the parser child has its own limits
GROWTH = 40 * 1024 * 1024  # what a rejected reload may leave behind in the daemon

ECHO = """
import taskd


async def echo(ctx, note: str = "", deep: object = None) -> None:
    ctx.log.info("echo_ran")


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("echo", echo)]
"""

TICK = '[jobs.tick]\ntype = "echo"\nevery = "200ms"\n'
OPTIONS = TICK + "[jobs.tick.options]\n"

# One dotted key of 39 KB: the file (10 s and 2.3 GB of `taskd check` before).
DOTTED = OPTIONS + "deep." + ".".join(["a"] * 19_500) + " = 1\n"
# Options nested past the bound, cheaply: each of these is a small file.
DEEP_DOTTED = OPTIONS + "deep." + ".".join(["a"] * 200) + " = 1\n"
DEEP_ARRAYS = OPTIONS + "deep = " + "[" * 500 + "]" * 500 + "\n"
DEEP_INLINE = OPTIONS + "deep = " + "{a = " * 300 + "1" + "}" * 300 + "\n"
# Bigger than the size cap, though only comments.
LARGE = TICK + ("# " + "c" * 70 + "\n") * (MAX_CONFIG_BYTES // 72 + 100)

# Valid TOML whose string holds a 300 KB line that looks like a table header to the
# key -> line scan: that scan was quadratic on it (a minute before the fix).
HEADER_IN_STRING = OPTIONS + 'note = """\n\\"""\n[a' + " " * 300_000 + 'x\n"""\n'

HOSTILE = {
    "dotted-39KB": (DOTTED, "nested"),
    "deep-dotted": (DEEP_DOTTED, "nested"),
    "deep-arrays": (DEEP_ARRAYS, "nested"),
    "deep-inline-tables": (DEEP_INLINE, "nested"),
    "large": (LARGE, "limit"),
}


def watch(proc: subprocess.Popen[str] | subprocess.Popen[bytes], what: str) -> float:
    """Wait for ``proc`` to exit, killing it (and failing) past LIMIT seconds or MAX_RSS.
    Returns the seconds taken."""
    began = time.monotonic()
    try:
        while proc.poll() is None:
            used, took = rss(proc.pid), time.monotonic() - began
            if used > MAX_RSS or took > LIMIT:
                raise AssertionError(
                    f"{what}: still running after {took:.1f}s, RSS {used >> 20} MiB"
                )
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.monotonic() - began


def check(path: Path) -> tuple[int, str]:
    out = path.with_suffix(".out")
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", "check", "--config", str(path)],
            cwd=path.parent,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        watch(proc, f"taskd check {path.name}")
    return proc.returncode, out.read_text()


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "plugins.d").mkdir(exist_ok=True)
    (tmp_path / "plugins.d" / "echo.py").write_text(ECHO)
    path = tmp_path / "taskd.toml"
    path.write_text(daemon_table() + body)
    return path


class TestCheck:
    """`taskd check` on each hostile shape: a prompt error naming the file and the bound."""

    @pytest.mark.parametrize("shape", list(HOSTILE))
    def test_hostile_shape_is_refused_promptly(self, tmp_path: Path, shape: str) -> None:
        body, word = HOSTILE[shape]
        path = write(tmp_path, body)
        code, output = check(path)
        assert code == 1, output
        assert f"{path}" in output, output
        assert word in output, output
        assert "limit" in output, output  # the bound is named, with its value
        assert "Error:" not in output and "Traceback" not in output, output

    def test_nesting_bound_names_the_key_and_the_limit(self, tmp_path: Path) -> None:
        path = write(tmp_path, DEEP_DOTTED)
        code, output = check(path)
        assert code == 1, output
        assert "jobs.tick.options.deep.a.a" in output, output
        assert f"the limit is {MAX_DEPTH}" in output, output

    def test_odd_but_valid_file_still_loads(self, tmp_path: Path) -> None:
        path = write(tmp_path, HEADER_IN_STRING)
        code, output = check(path)
        assert code == 0, output
        assert "OK" in output, output

    def test_nesting_just_within_the_bound_loads(self, tmp_path: Path) -> None:
        # jobs.tick.options.deep is 4 deep, its innermost array MAX_DEPTH: just within.
        inner = MAX_DEPTH - 3
        path = write(tmp_path, OPTIONS + "deep = " + "[" * inner + "]" * inner + "\n")
        code, output = check(path)
        assert code == 0, output


def start(d: DaemonProc) -> float:
    """Start the daemon and wait for `started` or its exit, bounded in time and memory."""
    began = time.monotonic()
    d.start(wait=False)
    while not d.events("started"):
        assert d.proc is not None
        if d.proc.poll() is not None:
            break
        used, took = rss(d.pid), time.monotonic() - began
        if used > MAX_RSS or took > LIMIT:
            d.kill()
            raise AssertionError(
                f"start: {took:.1f}s, RSS {used >> 20} MiB; log:\n" + "\n".join(d.raw[-20:])
            )
        time.sleep(0.02)
    return time.monotonic() - began


class TestDaemon:
    """A daemon given a hostile file: at start it exits 78 saying why; on SIGHUP the running
    config keeps running and the daemon's memory comes back to where it was."""

    @pytest.mark.parametrize("shape", ["dotted-39KB", "deep-arrays", "large"])
    def test_start_exits_78_naming_the_bound(self, daemon_factory, shape: str) -> None:
        body, word = HOSTILE[shape]
        d = daemon_factory(body, {"echo.py": ECHO})
        start(d)
        assert d.wait_exit(timeout=LIMIT) == 78, "\n".join(d.raw[-20:])
        output = "\n".join(d.raw)
        assert str(d.config_path) in output and word in output and "limit" in output, output
        assert not d.events("started")

    @pytest.mark.parametrize("shape", ["dotted-39KB", "deep-dotted", "large"])
    def test_sighup_keeps_the_old_config_and_memory(self, daemon_factory, shape: str) -> None:
        d = daemon_factory(TICK, {"echo.py": ECHO})
        start(d)
        d.wait_for("run", job="tick", outcome="succeeded", count=3, timeout=LIMIT)
        before = rss(d.pid)
        d.write_config(daemon_table() + HOSTILE[shape][0])
        began = time.monotonic()
        d.signal(signal.SIGHUP)
        while not d.events("reload_failed"):
            assert not d.events("reloaded"), "the hostile file was accepted"
            took = time.monotonic() - began
            assert rss(d.pid) < MAX_RSS and took < LIMIT, (took, rss(d.pid) >> 20)
            time.sleep(0.02)
        (failed,) = d.events("reload_failed")
        text = " ".join(failed["errors"])
        assert str(d.config_path) in text and "limit" in text, failed
        ran = len(d.events("run", job="tick", outcome="succeeded"))
        d.wait_for("run", job="tick", outcome="succeeded", count=ran + 3, timeout=LIMIT)
        after = rss(d.pid)
        assert after < before + GROWTH, f"RSS {before >> 20} MiB before, {after >> 20} MiB after"
        assert d.stop() == 0

    def test_sighup_with_odd_but_valid_file_reloads_promptly(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"echo.py": ECHO})
        start(d)
        d.write_config(daemon_table() + HEADER_IN_STRING)
        began = time.monotonic()
        d.signal(signal.SIGHUP)
        d.wait_for("reloaded", timeout=LIMIT)
        assert time.monotonic() - began < LIMIT
        assert d.stop() == 0
