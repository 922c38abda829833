"""Durations ("250ms", "1h30m", 90) and sizes ("512MiB") as the config writes them."""

from __future__ import annotations

import math
import re

import pytest

from taskd.config.durations import format_duration, parse_duration, parse_size


class TestParseDuration:
    """Strings of number+unit parts and plain numbers become seconds; anything else is refused."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            ("250ms", 0.25),
            ("1ms", 0.001),
            ("30s", 30.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("1h30m", 5400.0),
            ("2d", 172800.0),
            ("1w", 604800.0),
            ("1w2d3h4m5s6ms", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5 + 0.006),
            ("1.5h", 5400.0),
            ("0.5s", 0.5),
            ("0s", 0.0),
            ("  30s  ", 30.0),
            ("1h 30m", 5400.0),
            (90, 90.0),
            (0, 0.0),
            (2.5, 2.5),
            (0.25, 0.25),
        ],
    )
    def test_valid(self, value: object, seconds: float) -> None:
        result = parse_duration(value)
        assert isinstance(result, float)
        assert result == pytest.approx(seconds, abs=1e-9)

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("", "empty duration"),
            ("   ", "empty duration"),
            ("30", "cannot read '30' as a duration"),
            ("5x", "cannot read '5x' as a duration"),
            ("s", "cannot read 's' as a duration"),
            ("-5s", "cannot read '-5s' as a duration"),
            ("1h30", "cannot read '1h30' as a duration"),
            ("30S", "cannot read '30S' as a duration"),
            ("30sec", "cannot read '30sec' as a duration"),
            ("1.5.5s", "cannot read"),
            ("forever", "cannot read"),
            ("1e3s", "cannot read"),
            (-1, "finite number >= 0"),
            (-0.5, "finite number >= 0"),
            (math.inf, "finite number >= 0"),
            (math.nan, "finite number >= 0"),
            (True, "expected a duration"),
            (False, "expected a duration"),
            (None, "got NoneType"),
            ([30], "got list"),
            ({"s": 30}, "got dict"),
        ],
    )
    def test_invalid(self, value: object, fragment: str) -> None:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_duration(value)

    def test_unreadable_message_shows_examples(self) -> None:
        with pytest.raises(ValueError, match=r'"250ms".*"1h30m"'):
            parse_duration("10 minutes")


class TestFormatDuration:
    """Seconds become the shortest readable form that parse_duration reads back."""

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0.25, "250ms"),
            (0.001, "1ms"),
            (0.5, "500ms"),
            (1, "1s"),
            (30, "30s"),
            (59, "59s"),
            (60, "1m"),
            (90, "1m30s"),
            (300, "5m"),
            (3600, "1h"),
            (5400, "1h30m"),
            (3601, "1h1s"),
            (86400, "1d"),
            (90061, "1d1h1m1s"),
            (1.5, "1.5s"),
            (61.5, "1m1.5s"),
        ],
    )
    def test_format(self, seconds: float, text: str) -> None:
        assert format_duration(seconds) == text

    @pytest.mark.parametrize(
        "seconds", [0.25, 0.001, 1, 1.5, 30, 90, 3600, 5400, 86399, 86400, 90061, 1234567]
    )
    def test_round_trip(self, seconds: float) -> None:
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


class TestParseSize:
    """Sizes in bytes, decimal and binary units, case-insensitive; zero and junk are refused."""

    @pytest.mark.parametrize(
        ("value", "size"),
        [
            ("512MiB", 512 * 2**20),
            ("512mib", 512 * 2**20),
            ("512 MiB", 512 * 2**20),
            ("  2 GiB ", 2 * 2**30),
            ("1KiB", 1024),
            ("1.5KiB", 1536),
            ("1TiB", 2**40),
            ("2GB", 2 * 10**9),
            ("1kb", 1000),
            ("3MB", 3 * 10**6),
            ("1TB", 10**12),
            ("100B", 100),
            ("1048576", 1048576),
            (1024, 1024),
            (1, 1),
        ],
    )
    def test_valid(self, value: object, size: int) -> None:
        result = parse_size(value)
        assert isinstance(result, int)
        assert result == size

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("", "expected a size"),
            ("lots", "expected a size"),
            ("512 XB", "expected a size"),
            ("-1MiB", "expected a size"),
            ("1e3", "expected a size"),
            (1.5, "expected a size"),
            (None, "expected a size"),
            ([512], "expected a size"),
            (True, "expected a size"),
            (0, "must be > 0"),
            (-5, "must be > 0"),
            ("0MiB", "must be > 0"),
            ("0.4B", "must be > 0"),
        ],
    )
    def test_invalid(self, value: object, fragment: str) -> None:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_size(value)


class TestSystemdSizes:
    """A bare K/M/G/T suffix means binary units, as in systemd's MemoryMax=."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("512M", 512 * 2**20), ("2G", 2 * 2**30), ("64k", 64 * 2**10), ("1T", 2**40)],
    )
    def test_binary_suffix(self, value: str, expected: int) -> None:
        assert parse_size(value) == expected


class TestBounds:
    """Durations past 100 years are a config error, not an overflow later."""

    @pytest.mark.parametrize("value", [1e300, "99999999999999w", 101 * 365 * 86400])
    def test_too_long(self, value: object) -> None:
        with pytest.raises(ValueError, match="more than 100 years"):
            parse_duration(value)
