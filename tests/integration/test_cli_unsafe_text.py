"""What jobs and plugins wrote, read back through every human-readable command of a real
daemon: a lone surrogate (``json.loads('"\\ud800"')`` of cut UTF-16 text), escape sequences
and bidi controls in results, errors and plugin descriptions are printed as backslash
escapes. Before, ``taskd history`` died of UnicodeEncodeError on the surrogate, and the rest
reached the terminal raw (U+202E shows text backwards; ESC sequences recolour, retitle or
clear it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import DaemonProc, poll

pytestmark = pytest.mark.timeout(120)

ODD = r"""
import taskd

VALUE = {"\u202e\x00name\ud800": "\U0001F600", "nl": "line1\nline2\r\n\x1b[31mred\x9b"}


async def odd(ctx):
    return VALUE


async def bad(ctx):
    raise ValueError("boom \x1b]0;pwned\x07 \u202eevil\ud800 \u2066x\u2069")


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("odd", odd, description="returns odd text \x1b[2J\u202e"),
        taskd.JobType("bad", bad, description="fails with odd text"),
    ]
"""
CONFIG = """
[jobs.j]
type = "odd"
on = "startup"

[jobs.b]
type = "bad"
on = "startup"
"""
# What must never reach the terminal: C0 controls but the newline, DEL, C1 controls, the
# line/paragraph separators, bidi controls, and surrogates (never in valid UTF-8 anyway).
UNSAFE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def cli(d: DaemonProc, *args: str) -> tuple[int, str, str]:
    """Run a taskd command on d's config; its exit code, stdout and stderr, each checked to
    be valid UTF-8 with nothing a terminal would act on."""
    r = subprocess.run(
        [sys.executable, "-m", "taskd", *args, "-c", str(d.config_path)],
        capture_output=True,
        timeout=60,
        cwd=d.dir,
        env={**os.environ, "COLUMNS": "300"},  # wide enough to show every value whole
    )
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")  # strict: raises if not
    for name, text in (("stdout", out), ("stderr", err)):
        bad = sorted({f"U+{ord(c):04X}" for c in UNSAFE.findall(text)})
        assert not bad, f"taskd {' '.join(args)}: {name} holds {bad}:\n{text}"
    assert "Traceback" not in err, err
    return r.returncode, out, err


@pytest.fixture
def daemon(daemon_factory) -> DaemonProc:
    d = daemon_factory(CONFIG, {"odd.py": ODD}).start()
    d.wait_for("run", job="j", timeout=30)
    d.wait_for("run", job="b", timeout=30)
    # The run line comes before the commit that ends the row.
    poll(lambda: {r["outcome"] for r in d.history()} == {"succeeded", "failed"}, timeout=10)
    return d


class TestUnsafeText:
    """Every table and line shows the characters escaped, and the command succeeds."""

    @pytest.mark.parametrize("args", [("history",), ("history", "j"), ("history", "--failed")])
    def test_history(self, daemon: DaemonProc, args: tuple[str, ...]) -> None:
        code, out, _ = cli(daemon, *args)
        assert code == 0
        if args[-1] != "--failed":
            # The result is shown as JSON (NUL is \u0000 there), the rest escaped for the
            # terminal; the emoji is printable and shown as it is.
            assert '{"\\u202e\\u0000name\\ud800": "\U0001f600"' in out, out
        if args[-1] != "j":
            assert "boom \\x1b]0;pwned\\x07 \\u202eevil\\ud800 \\u2066x\\u2069" in out, out

    @pytest.mark.parametrize("command", ["jobs", "status"])
    def test_jobs_and_status(self, daemon: DaemonProc, command: str) -> None:
        code, out, _ = cli(daemon, command)
        assert code == 0
        # The failing job's last error is shown under the table.
        assert "b: last error: ValueError: boom \\x1b]0;pwned\\x07" in out, out

    @pytest.mark.parametrize("verbose", [False, True])
    def test_plugins(self, daemon: DaemonProc, verbose: bool) -> None:
        code, out, _ = cli(daemon, "plugins", *(["-v"] if verbose else []))
        assert code == 0
        assert "returns odd text \\x1b[2J\\u202e" in out, out

    def test_trigger_wait(self, daemon: DaemonProc) -> None:
        code, _, err = cli(daemon, "trigger", "b", "--wait")
        assert code == 1
        assert "\\x1b]0;pwned\\x07 \\u202eevil\\ud800" in err, err

    def test_json_keeps_the_value(self, daemon: DaemonProc) -> None:
        """--json is for scripts: the exact value, as JSON escapes (ASCII)."""
        code, out, _ = cli(daemon, "history", "j", "--json")
        assert code == 0 and '"\\u202e\\u0000name\\ud800": "\\ud83d\\ude00"' in out, out
