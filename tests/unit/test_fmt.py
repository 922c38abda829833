"""The CLI's text helpers (taskd.cli.fmt): tables, times, durations, abbreviations."""

from __future__ import annotations

import time

import pytest

from taskd.cli import fmt

# 2026-12-02 14:05:03 UTC
T = 1796220303.0


class TestTable:
    """Aligned columns, two spaces apart, header first, no trailing whitespace."""

    def test_aligned(self) -> None:
        out = fmt.table(["NAME", "STATE", "NOTE"], [["a", "running", ""], ["longer", "ok", "x"]])
        assert out.splitlines() == [
            "NAME    STATE    NOTE",
            "a       running",
            "longer  ok       x",
        ]

    def test_right_aligned_columns(self) -> None:
        out = fmt.table(
            ["JOB", "RUNS", "TOOK"], [["a", "5", "1.2s"], ["b", "120", "350ms"]], right={1, 2}
        )
        assert out.splitlines() == [
            "JOB  RUNS   TOOK",
            "a       5   1.2s",
            "b     120  350ms",
        ]

    def test_no_rows_is_the_header(self) -> None:
        assert fmt.table(["A", "B"], []) == "A  B"

    def test_no_trailing_whitespace_or_newline(self) -> None:
        out = fmt.table(["A", "B"], [["x", ""], ["yyyy", ""]])
        assert not out.endswith("\n")
        assert all(line == line.rstrip() for line in out.splitlines())

    def test_wide_characters_count_two_cells(self) -> None:
        out = fmt.table(["A", "B"], [["日本", "x"], ["ab", "y"]])
        assert out.splitlines() == ["A     B", "日本  x", "ab    y"]

    def test_newlines_in_cells_cannot_break_rows(self) -> None:
        out = fmt.table(["A", "B"], [["x\ny", "z\tw"]])
        assert out.splitlines() == ["A    B", "x y  z w"]

    def test_ragged_row_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="row 1 has 1 cells for 2 headers"):
            fmt.table(["A", "B"], [["1", "2"], ["3"]])


@pytest.mark.usefixtures("berlin")
class TestLocalTime:
    """Local wall-clock time, honouring TZ, DST included."""

    @pytest.mark.parametrize(
        ("ts", "expected"),
        [
            (T, "2026-12-02 15:05:03"),  # CET, UTC+1
            (T - 183 * 86400, "2026-06-02 16:05:03"),  # CEST, UTC+2
            (0.0, "1970-01-01 01:00:00"),
            (T + 0.999, "2026-12-02 15:05:03"),  # seconds are cut, not rounded
            (None, "-"),
            (float("nan"), "-"),
        ],
    )
    def test_cases(self, ts: float | None, expected: str) -> None:
        assert fmt.local_time(ts) == expected

    def test_follows_tz(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TZ", "Asia/Kolkata")
        time.tzset()
        assert fmt.local_time(T) == "2026-12-02 19:35:03"


class TestRelative:
    """A time seen from now: at most two units, 'now' within a second."""

    @pytest.mark.parametrize(
        ("delta", "expected"),
        [
            (0, "now"),
            (0.4, "now"),
            (-0.4, "now"),
            (12, "in 12s"),
            (-12, "12s ago"),
            (240, "in 4m"),
            (239.6, "in 4m"),  # rounded to whole seconds first
            (245, "in 4m 5s"),
            (-7200, "2h ago"),
            (-3900, "1h 5m ago"),
            (-3930, "1h 5m ago"),  # seconds are a third unit: dropped
            (-3630, "1h ago"),  # the second unit is 0 minutes: dropped, not 30s shown
            (-3 * 86400, "3d ago"),
            (-(3 * 86400 + 4 * 3600 + 300), "3d 4h ago"),
            (400 * 86400, "in 400d"),
        ],
    )
    def test_cases(self, delta: float, expected: str) -> None:
        assert fmt.relative(T + delta, T) == expected

    def test_none(self) -> None:
        assert fmt.relative(None, T) == "-"


class TestDuration:
    """As precise as useful at each scale; rounding never gives '1000ms' or '60s'."""

    @pytest.mark.parametrize(
        ("seconds", "expected"),
        [
            (None, "-"),
            (0, "0s"),
            (1e-7, "<1µs"),
            (12e-6, "12µs"),
            (0.0009996, "1ms"),
            (0.35, "350ms"),
            (0.9996, "1.0s"),
            (1.2, "1.2s"),
            (1.25, "1.2s"),  # banker's rounding of 12.5 tenths; either is fine, this is stable
            (9.96, "10s"),
            (42.4, "42s"),
            (59.6, "1m 00s"),
            (123, "2m 03s"),
            (3599.6, "1h 00m"),
            (3720, "1h 02m"),
            (3779, "1h 02m"),  # minutes are cut at this scale, not rounded
            (86400 * 3 + 3600 * 4, "3d 04h"),
            (-2, "-2.0s"),
            (float("inf"), "-"),
        ],
    )
    def test_cases(self, seconds: float | None, expected: str) -> None:
        assert fmt.duration(seconds) == expected


class TestOneLine:
    """Whitespace collapsed, cut to a width with an ellipsis."""

    @pytest.mark.parametrize(
        ("text", "width", "expected"),
        [
            (None, 10, ""),
            ("", 10, ""),
            ("  a\n\n b\tc  ", 10, "a b c"),
            ("exactly10!", 10, "exactly10!"),
            ("exactly 11!", 10, "exactly 1…"),
            ("Traceback:\n  File x\nValueError: bad", 20, "Traceback: File x V…"),
            ("word  space", 6, "word…"),  # no space left before the ellipsis
            ("日本語のテキスト", 7, "日本語…"),
            ("abc", 0, ""),
        ],
    )
    def test_cases(self, text: str | None, width: int, expected: str) -> None:
        out = fmt.one_line(text, width)
        assert out == expected
        assert fmt.text_width(out) <= max(width, 0)


class TestJsonResult:
    """A job's result shortened for a table cell, keys first."""

    @pytest.mark.parametrize(
        ("value", "width", "expected"),
        [
            ({"n": 5, "ok": True}, 40, '{"n": 5, "ok": true}'),
            ([1, 2, 3], 40, "[1, 2, 3]"),
            ("plain", 40, '"plain"'),
            (3.5, 40, "3.5"),
            (None, 40, "null"),
            ({}, 40, "{}"),
            ({"ü": "ß"}, 40, '{"ü": "ß"}'),  # not \\u escapes: this is for reading
            # Long strings and deep nesting shrink so the keys stay in view...
            (
                {"blob": "x" * 5000, "n": 5, "deep": {"a": {"b": 1}}},
                90,
                '{"blob": "' + "x" * 39 + '…", "n": 5, "deep": {"a": {…}}}',
            ),
            (
                {"blob": "x" * 5000, "n": 5, "deep": {"a": {"b": 1}}},
                60,
                '{"blob": "xxxxxxxxxxx…", "n": 5, "deep": {…}}',
            ),
            # ...and what still does not fit is cut.
            ({"blob": "x" * 5000, "n": 5}, 12, '{"blob": "x…'),
            ("y" * 100, 10, '"yyyyyyyy…'),
        ],
    )
    def test_values(self, value: object, width: int, expected: str) -> None:
        assert fmt.json_value(value, width) == expected

    def test_truncated_result_says_so(self) -> None:
        stored = '{"rows": [1, 2, 3' + "...(truncated)"
        assert fmt.json_value(stored, 30) == '{"rows": [1, 2, 3 [truncated]'
        assert fmt.json_value(stored, 20) == '{"rows"… [truncated]'


class TestSafe:
    """What a terminal would act on, or cannot show, is printed as a backslash escape."""

    @pytest.mark.parametrize(
        ("text", "shown"),
        [
            ("\x1b[2Jgone", "\\x1b[2Jgone"),  # an escape sequence: clear the screen
            ("abc\u202edef", "abc\\u202edef"),  # right-to-left override
            ("\u2066x\u2069\u200f", "\\u2066x\\u2069\\u200f"),  # isolates, a mark
            ("nul\x00 del\x7f c1\x9b", "nul\\x00 del\\x7f c1\\x9b"),
            ("line\u2028sep", "line\\u2028sep"),
            ("lone \ud800 \udfff", "lone \\ud800 \\udfff"),
            ("tab\tnl\n", "tab\\x09nl\\x0a"),
        ],
    )
    def test_escaped(self, text: str, shown: str) -> None:
        assert fmt.safe(text) == shown
        assert fmt.safe(shown) == shown  # escaping twice changes nothing

    @pytest.mark.parametrize(
        "text", ["plain", "日本語", "e\u0301", "\U0001f600", "a\u200db", "é ü"]
    )
    def test_printable_left_alone(self, text: str) -> None:
        assert fmt.safe(text) == text

    def test_table_cells_and_one_line(self) -> None:
        out = fmt.table(["A", "B"], [["\ud800", "x\x1by"]])
        assert out.splitlines()[1] == "\\ud800  x\\x1by"
        assert out.encode("utf-8")  # printable: no surrogate left
        # Whitespace collapses first; widths count the escapes as shown.
        assert fmt.one_line("a\n\u202eb\x1bc", 9) == "a \\u202e…"

    def test_safe_lines_keeps_line_breaks(self) -> None:
        assert fmt.safe_lines("one\x1b\ntwo\u202e") == "one\\x1b\ntwo\\u202e"
