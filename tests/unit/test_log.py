"""Log set-up: console lines on a terminal, JSON lines otherwise, the level filter, and the
syslog priority prefix when the stream is the journal."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog

from taskd import log as logsetup

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The console's head: short local time, then the level padded to 8.
_HEAD = r"\d\d:\d\d:\d\d\.\d{3} "


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("structlog_reset")


def _journal_env(monkeypatch: pytest.MonkeyPatch, stream: TextIO) -> None:
    """Point JOURNAL_STREAM at ``stream``'s fd, as systemd does for a service's stdout."""
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def _console(stream: io.StringIO | None = None) -> io.StringIO:
    out = stream if stream is not None else io.StringIO()
    logsetup.configure("debug", "console", out)
    return out


class TestFormat:
    """`auto` picks by whether the stream is a terminal."""

    def test_auto_is_json_when_not_a_tty(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "auto", out)
        structlog.get_logger("t").info("run", job="a", outcome="succeeded")
        line = json.loads(out.getvalue())
        assert line["event"] == "run" and line["job"] == "a" and line["level"] == "info"
        assert line["timestamp"].endswith("Z")

    def test_auto_is_console_on_a_tty(self) -> None:
        out = _Tty()
        logsetup.configure("info", "auto", out)
        structlog.get_logger("t").info("run", job="a")
        raw = out.getvalue()
        assert "\x1b[" in raw  # coloured on a terminal
        text = _ANSI.sub("", raw)
        assert re.fullmatch(_HEAD + r"info     run job=a\n", text), text
        assert not text.lstrip().startswith("{")  # a line for people, not a JSON object

    def test_forced_json_on_a_tty(self) -> None:
        out = _Tty()
        logsetup.configure("info", "json", out)
        structlog.get_logger("t").info("x")
        assert json.loads(out.getvalue())["event"] == "x"


class TestJsonUnchanged:
    """JSON lines are what they were: one object per line, the same keys in the same order."""

    def test_keys_and_order(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        log = structlog.get_logger("t")
        log.info("run", job="a", run_id="r1", duration=0.0123, result={"ok": True})
        log.warning("skipped", job="a", reason="overlap")
        lines = out.getvalue().splitlines()
        assert len(lines) == 2
        first = json.loads(lines[0])
        assert list(first) == ["job", "run_id", "duration", "result", "event", "level", "timestamp"]
        assert first["duration"] == 0.0123 and first["result"] == {"ok": True}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])

    def test_traceback_stays_inside_the_object(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("t").exception("failed", job="a")
        (line,) = out.getvalue().splitlines()
        exc = json.loads(line)["exception"]
        assert exc[0]["exc_type"] == "ValueError" and exc[0]["exc_value"] == "boom"


class TestJournalPriority:
    """Under the journal each line starts with its syslog priority; elsewhere nothing changes."""

    LEVELS = (
        ("debug", "<7>"),
        ("info", "<6>"),
        ("warning", "<4>"),
        ("error", "<3>"),
        ("critical", "<2>"),
    )

    def test_each_level_gets_its_number(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with open(tmp_path / "stdout", "w+") as out:
            _journal_env(monkeypatch, out)
            logsetup.configure("debug", "json", out)
            log = structlog.get_logger("t")
            for name, _ in self.LEVELS:
                getattr(log, name)("ev", job="a", level_was=name)
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("crashed", job="a")
            out.seek(0)
            lines = out.read().splitlines()
        expected = [prefix for _, prefix in self.LEVELS] + ["<3>"]
        assert [line[:3] for line in lines] == expected
        for line in lines:
            # journald strips the prefix; what it keeps is still one JSON object.
            obj = json.loads(line[3:])
            assert obj["job"] == "a" and "\n" not in line
        assert json.loads(lines[-1][3:])["exception"][0]["exc_type"] == "ValueError"

    def test_json_after_the_prefix_is_the_same_object(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        plain = io.StringIO()
        logsetup.configure("info", "json", plain)
        structlog.get_logger("t").info("run", job="a", duration=0.5, result=[1, "x"])
        with open(tmp_path / "stdout", "w+") as out:
            _journal_env(monkeypatch, out)
            logsetup.configure("info", "json", out)
            structlog.get_logger("t").info("run", job="a", duration=0.5, result=[1, "x"])
            out.seek(0)
            prefixed = out.read()
        unstamp = re.compile(r'"timestamp": "[^"]*"')
        assert prefixed.startswith("<6>{")
        assert unstamp.sub("", prefixed[3:]) == unstamp.sub("", plain.getvalue())

    def test_no_prefix_when_journal_stream_names_another_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A job's child inherits JOURNAL_STREAM even when its own stdout goes elsewhere.
        with open(tmp_path / "journal", "w") as other, open(tmp_path / "stdout", "w+") as out:
            _journal_env(monkeypatch, other)
            logsetup.configure("info", "json", out)
            structlog.get_logger("t").error("run", job="a")
            out.seek(0)
            assert out.read().startswith("{")

    @pytest.mark.parametrize("value", ["", "garbage", "1:x", ":"])
    def test_no_prefix_when_journal_stream_is_malformed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        monkeypatch.setenv("JOURNAL_STREAM", value)
        with open(tmp_path / "stdout", "w+") as out:
            logsetup.configure("info", "json", out)
            structlog.get_logger("t").error("run", job="a")
            out.seek(0)
            assert out.read().startswith("{")

    def test_a_stream_without_a_file_is_never_the_journal(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("JOURNAL_STREAM", "1:1")
        assert not logsetup.is_journal(io.StringIO())

    def test_stdlib_logging_gets_its_priority_too(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with open(tmp_path / "stdout", "w+") as out:
            _journal_env(monkeypatch, out)
            logsetup.configure("info", "json", out)
            logging.getLogger("asyncio").warning("slow callback")
            out.seek(0)
            assert out.read().startswith('<4>{"event": "slow callback"')

    def test_console_in_the_journal_marks_every_line(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # journald files each line on its own: a traceback line without the prefix would be
        # filed as info and vanish from `journalctl -p err`.
        with open(tmp_path / "stdout", "w+") as out:
            _journal_env(monkeypatch, out)
            logsetup.configure("info", "console", out)
            try:
                raise ValueError("boom")
            except ValueError:
                structlog.get_logger("t").exception("crashed", job="a")
            out.seek(0)
            lines = out.read().splitlines()
        assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
        assert "\x1b[" not in "".join(lines)  # not a terminal: no colour


class TestConsole:
    """Lines for people: event, then job, durations in ms or s, short results, tracebacks."""

    def test_run_line(self) -> None:
        out = _console()
        structlog.get_logger("t").info(
            "run",
            run_id="r1",
            attempt=1,
            job="tick",
            outcome="succeeded",
            duration=0.0123,
            late=0.0004,
            result={"ok": True, "n": 3},
        )
        line = out.getvalue()
        expected = (
            _HEAD + r"info     run job=tick run_id=r1 attempt=1 outcome=succeeded "
            r'duration=12\.3ms late=0\.4ms result=\{"ok":true,"n":3\}\n'
        )
        assert re.fullmatch(expected, line), line

    def test_order_is_stable_whatever_the_values(self) -> None:
        out = _console()
        log = structlog.get_logger("t")
        log.warning("skipped", reason="overlap", job="a", count=2)
        log.warning("skipped", reason="paused", job="b", count=1)
        keys = [re.findall(r" (\w+)=", line) for line in out.getvalue().splitlines()]
        assert keys == [["job", "reason", "count"]] * 2

    def test_short_local_time(self) -> None:
        out = _console()
        before = time.strftime("%H:%M:%S")
        structlog.get_logger("t").info("x")
        after = time.strftime("%H:%M:%S")
        stamp = out.getvalue()[:8]
        assert before <= stamp <= after or after < before  # (or midnight passed)

    @pytest.mark.parametrize(
        ("seconds", "shown"),
        [
            (0.0123, "12.3ms"),
            (0.0004, "0.4ms"),
            (2.3e-05, "0.0ms"),
            (0, "0.0ms"),
            (0.25, "250ms"),
            (0.9996, "1.00s"),
            (1.25, "1.25s"),
            (42.04, "42.0s"),
            (3600.4, "3600s"),
            (-0.002, "-2.0ms"),
        ],
    )
    def test_durations(self, seconds: float, shown: str) -> None:
        assert logsetup.seconds(seconds) == shown

    def test_every_duration_key_is_formatted(self) -> None:
        out = _console()
        fields = {k: 1.25 for k in sorted(logsetup.DURATION_KEYS)}
        structlog.get_logger("t").info("x", by=0.5, **fields)
        line = out.getvalue()
        for key in logsetup.DURATION_KEYS:
            assert f" {key}=1.25s" in line, line
        assert " by=0.5" in line  # not a duration: left as it is

    def test_a_duration_given_as_text_is_left_alone(self) -> None:
        out = _console()
        structlog.get_logger("t").warning("state_write_failed", retry_in="1s", flag=True)
        assert out.getvalue().rstrip().endswith("retry_in=1s flag=True")

    def test_long_result_is_one_short_line(self) -> None:
        out = _console()
        result = {"lines": ["first\nsecond"] * 20, "note": "x" * 200}
        structlog.get_logger("t").info("run", job="a", result=result)
        line = out.getvalue()
        assert line.count("\n") == 1
        shown = line.rstrip("\n").split(" result=", 1)[1]
        assert len(shown) == logsetup.RESULT_WIDTH and shown.endswith("…")
        assert shown.startswith('{"lines":["first\\nsecond",')

    def test_result_that_is_not_json_shows_its_repr(self) -> None:
        class Thing:
            def __repr__(self) -> str:
                return "<Thing>"

        assert logsetup.summary(Thing()) == '"<Thing>"'
        assert logsetup.summary({"a": 1}) == '{"a":1}'

    def test_strings_with_spaces_are_quoted(self) -> None:
        out = _console()
        structlog.get_logger("t").error("run", job="a", error="exit code 3\nstderr: no")
        assert out.getvalue().rstrip().endswith("error='exit code 3\\nstderr: no'")

    def test_traceback_is_printed_as_one(self) -> None:
        out = _console()
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("t").exception("scheduler_crashed", job="a")
        lines = out.getvalue().splitlines()
        assert re.fullmatch(_HEAD + "error    scheduler_crashed job=a", lines[0]), lines[0]
        assert lines[1] == "Traceback (most recent call last):"
        assert any(line.strip() == 'raise ValueError("boom")' for line in lines)
        assert lines[-1] == "ValueError: boom"

    def test_exception_passed_as_exc_info(self) -> None:
        out = _console()
        exc: BaseException | None = None
        try:
            raise KeyError("k")
        except KeyError as e:
            exc = e
        structlog.get_logger("t").error("run_crashed", job="a", exc_info=exc)
        text = out.getvalue()
        assert "\nTraceback (most recent call last):\n" in text
        assert text.rstrip().endswith("KeyError: 'k'")

    def test_stdlib_traceback_too(self) -> None:
        out = _console()
        try:
            raise OSError("disk")
        except OSError:
            logging.getLogger("asyncio").exception("callback failed")
        lines = out.getvalue().splitlines()
        assert lines[0].endswith("error    callback failed")
        assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "OSError: disk"

    @pytest.mark.parametrize(
        ("stream", "no_color", "coloured"),
        [(_Tty, "", True), (_Tty, "1", False), (io.StringIO, "", False)],
    )
    def test_colour_only_when_on(
        self, monkeypatch: pytest.MonkeyPatch, stream: Any, no_color: str, coloured: bool
    ) -> None:
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        out = _console(stream=stream())
        structlog.get_logger("t").error("run", job="a")
        raw = out.getvalue()
        assert ("\x1b[31m" in raw) is coloured  # red for an error
        assert _ANSI.sub("", raw).split()[1:4] == ["error", "run", "job=a"]


class TestLevel:
    """`log_level` drops lines below it, for structlog and stdlib logging alike."""

    def test_debug_dropped_at_info(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        structlog.get_logger("t").debug("hidden")
        structlog.get_logger("t").warning("shown")
        events = [json.loads(x)["event"] for x in out.getvalue().splitlines()]
        assert events == ["shown"]

    def test_stdlib_logging_goes_through_the_same_renderer(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        logging.getLogger("asyncio").error("something from a library")
        line = json.loads(out.getvalue())
        assert line["event"] == "something from a library" and line["level"] == "error"


class _Failing(io.StringIO):
    """A stream whose writes fail with ``errno`` while ``failing`` is set."""

    def __init__(self, err: int) -> None:
        super().__init__()
        self.err = err
        self.failing = True
        self.tries = 0

    def write(self, text: str) -> int:
        self.tries += 1
        if self.failing:
            raise OSError(self.err, os.strerror(self.err))
        return super().write(text)


def _null_ids() -> tuple[int, int]:
    st = os.stat(os.devnull)
    return st.st_dev, st.st_ino


class TestOutputFailures:
    """A line the output cannot take is dropped and counted, never raised into the caller."""

    def test_reader_of_the_pipe_gone(self) -> None:
        r, w = os.pipe()
        os.close(r)
        with open(w, "w") as stream:  # block-buffered, as stdout on a pipe
            logsetup.configure("info", "json", stream)
            before = logsetup.dropped_lines()
            log = structlog.get_logger("t")
            for n in range(3):
                log.info("run", n=n)  # must not raise BrokenPipeError
            logging.getLogger("asyncio").error("and through stdlib logging")
            assert logsetup.dropped_lines() == before + 4
            # Gone for good: the fd is /dev/null now, so Python's own flush cannot fail.
            st = os.fstat(w)
            assert (st.st_dev, st.st_ino) == _null_ids()
            stream.write("late print\n")
            stream.flush()

    def test_gone_stream_costs_no_write(self) -> None:
        stream = _Failing(errno.EPIPE)
        logsetup.configure("info", "json", stream)
        before = logsetup.dropped_lines()
        for _ in range(5):
            structlog.get_logger("t").info("x")
        assert stream.tries == 1
        assert logsetup.dropped_lines() == before + 5
        # A reload's configure() on the same stream keeps it gone (and counted).
        logsetup.configure("debug", "json", stream)
        structlog.get_logger("t").info("after reload")
        assert stream.tries == 1 and logsetup.dropped_lines() == before + 6

    @pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
    def test_full_disk_drops_the_line_and_tries_the_next(self, err: int) -> None:
        stream = _Failing(err)
        logsetup.configure("info", "json", stream)
        before = logsetup.dropped_lines()
        structlog.get_logger("t").info("lost")
        stream.failing = False  # room again
        structlog.get_logger("t").info("kept")
        assert logsetup.dropped_lines() == before + 1
        assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["kept"]

    def test_dev_full(self) -> None:
        stream = open("/dev/full", "w")  # noqa: SIM115 (its close fails: the bytes are still there)
        logsetup.configure("info", "json", stream)
        before = logsetup.dropped_lines()
        for _ in range(3):
            structlog.get_logger("t").info("x")
        assert logsetup.dropped_lines() == before + 3
        with contextlib.suppress(OSError):
            stream.close()

    def test_closed_stream(self) -> None:
        stream = io.StringIO()
        logsetup.configure("info", "json", stream)
        stream.close()  # a plugin closed sys.stdout, say
        before = logsetup.dropped_lines()
        structlog.get_logger("t").info("x")
        structlog.get_logger("t").error("y")
        assert logsetup.dropped_lines() == before + 2

    def test_unencodable_line_costs_that_line_only(self) -> None:
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict", write_through=True)
        logsetup.configure("info", "console", stream)
        before = logsetup.dropped_lines()
        structlog.get_logger("t").info("run", path="caf\udce9")  # a lone surrogate
        structlog.get_logger("t").info("next")
        assert logsetup.dropped_lines() == before + 1
        assert raw.getvalue().decode().rstrip().endswith("next")

    def test_no_stdout_at_all(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # `taskd run >&-`: Python starts with sys.stdout None.
        monkeypatch.setattr(sys, "stdout", None)
        monkeypatch.setattr(logsetup, "_std_fds_open", lambda: None)  # not pytest's own fds
        logsetup.configure("info", "auto")
        before = logsetup.dropped_lines()
        structlog.get_logger("t").info("x")
        assert logsetup.dropped_lines() == before + 1
        logsetup.flush_std_streams()

    def test_flush_std_streams_never_raises(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(sys, "stdout", _Failing(errno.EPIPE))
        closed = io.StringIO()
        closed.close()
        monkeypatch.setattr(sys, "stderr", closed)
        logsetup.flush_std_streams()


class _Custom:
    def __structlog__(self) -> str:
        return "custom!"


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque é>"


def _reference_chain() -> list[Any]:
    """structlog's own processors, as configure() chained them before JsonLines."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.dict_tracebacks,
        structlog.processors.JSONRenderer(),
    ]


def _through(chain: list[Any], method: str, event_dict: dict[str, Any]) -> str:
    for proc in chain:
        event_dict = proc(None, method, event_dict)
    return str(event_dict)


class TestJsonLinesIsTheChain:
    """JsonLines writes byte for byte what structlog's chain of five processors wrote."""

    _STAMP = re.compile(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"')

    def _events(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            raise ValueError("boom ü")
        except ValueError:
            exc = sys.exc_info()
        return [
            ("info", {"job": "a", "run_id": "r1", "attempt": 1, "event": "run"}),
            ("warn", {"event": "skipped", "reason": "overlap"}),
            ("exception", {"event": "crashed", "exc_info": exc}),
            ("error", {"event": "failed", "exc_info": exc[1]}),
            ("info", {"event": "x", "exc_info": False, "after": 1}),
            ("debug", {"level": "kept in place", "event": "lvl", "timestamp": 0}),
            ("info", {"event": "text", "s": 'ünïcödé "q" \\ \n\t\x00', "f": 1e-7, "n": None}),
            ("info", {"event": "odd", "c": _Custom(), "o": _Opaque(), "t": (1, 2.5, True)}),
            ("info", {"event": "nan", "v": float("nan"), "i": float("inf"), "big": 2**70}),
            ("critical", {"event": "nested", "d": {"k": [1, {"x": "y"}]}, 3: "int key"}),
            ("fatal", {"event": "unknown method"}),
        ]

    @pytest.mark.parametrize("journal", [False, True])
    def test_same_bytes(self, journal: bool) -> None:
        ours = logsetup.JsonLines(journal=journal)
        structlog.contextvars.clear_contextvars()
        for bound in (False, True):
            if bound:
                structlog.contextvars.bind_contextvars(request="req-1", job="from context")
            try:
                for method, event in self._events():
                    want = _through(_reference_chain(), method, dict(event))
                    if journal:
                        want = logsetup.PRIORITY.get(method, "<6>") + want
                    got = ours(None, method, dict(event))
                    assert self._STAMP.sub("T", got) == self._STAMP.sub("T", want)
                    assert self._STAMP.search(got) is not None
            finally:
                structlog.contextvars.clear_contextvars()

    def test_configured_line_is_the_chain(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        structlog.get_logger("t").bind(job="a").info("run", outcome="succeeded", late=0.5)
        want = _through(
            _reference_chain(),
            "info",
            {"job": "a", "outcome": "succeeded", "late": 0.5, "event": "run"},
        )
        assert self._STAMP.sub("T", out.getvalue()) == self._STAMP.sub("T", want) + "\n"

    def test_orjson_would_not_do(self) -> None:
        # Why the stdlib encoder stays (see JsonLines): users grep `"event": "run"` (a space
        # after the colon) and read escaped non-ASCII; orjson writes neither.
        line = logsetup.JsonLines()(None, "info", {"event": "run", "who": "é"})
        assert '"event": "run"' in line and '"who": "\\u00e9"' in line


class TestUtcStamp:
    """utc_stamp() is datetime's ISO text in UTC, always with six digits of fraction."""

    @pytest.mark.parametrize(
        "ns",
        [
            1_796_223_012_481_234_567,
            1_796_223_012_000_000_000,  # a whole second: the fraction is still there
            1_796_223_012_999_999_999,  # rounded down, as datetime.now() does
            1_796_223_013_000_001_000,
            0,
            1_798_761_599_999_999_000,  # the last microsecond of a year
        ],
    )
    def test_text(self, monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
        import datetime

        monkeypatch.setattr(time, "time_ns", lambda: ns)
        moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            microseconds=ns // 1000
        )
        want = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert logsetup.utc_stamp() == want
        assert datetime.datetime.fromisoformat(want) == moment

    def test_a_new_second_is_seen(self, monkeypatch: pytest.MonkeyPatch) -> None:
        now = [1_796_223_012_999_999_000]
        monkeypatch.setattr(time, "time_ns", lambda: now[0])
        assert logsetup.utc_stamp().endswith("12.999999Z")
        now[0] += 1000
        assert logsetup.utc_stamp().endswith("13.000000Z")
        now[0] -= 1000  # the clock stepped back: the text follows it
        assert logsetup.utc_stamp().endswith("12.999999Z")

    def test_sorts_as_the_time_does(self) -> None:
        a = logsetup.utc_stamp()
        b = logsetup.utc_stamp()
        assert a <= b and len(a) == len(b) == len("2026-11-21T02:30:12.481234Z")
