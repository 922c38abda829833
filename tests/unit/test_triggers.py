"""Table tests for taskd.schedule.triggers: Every, Cron, At and upcoming().

Every expected instant is written out as a datetime; comments give the local wall-clock time.
"""

from __future__ import annotations

import itertools
import math
import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from taskd.schedule.triggers import At, Cron, Every, Trigger, stable_offset, upcoming

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
CHATHAM = ZoneInfo("Pacific/Chatham")
ZONE_UTC = ZoneInfo("UTC")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    """A UTC instant written out in full: utc(2026, 3, 29, 1, 0) is 2026-03-29T01:00:00Z."""
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def ts(when: datetime) -> float:
    return when.timestamp()


def as_utc(times: list[float]) -> list[datetime]:
    return [datetime.fromtimestamp(t, UTC) for t in times]


def below(when: datetime) -> float:
    """The largest float strictly before `when`."""
    return math.nextafter(when.timestamp(), -math.inf)


NEW_YEAR = utc(2026, 1, 1)


class TestEvery:
    """Every: anchored ticks at anchor + k * interval, robust to float rounding."""

    @pytest.mark.parametrize(
        ("interval", "anchor", "after", "expected"),
        [
            # anchor 0: ticks on whole multiples of the interval since the epoch
            (30, 0.0, utc(2026, 3, 1, 12, 0, 10), utc(2026, 3, 1, 12, 0, 30)),
            (3600, 0.0, utc(2026, 3, 1, 12, 59, 59), utc(2026, 3, 1, 13, 0)),
            # after exactly on a tick: the next tick, never the same one
            (30, 0.0, utc(2026, 3, 1, 12, 0, 30), utc(2026, 3, 1, 12, 1, 0)),
            (86400, 0.0, utc(2026, 3, 1), utc(2026, 3, 2)),
            # anchor offsets: ticks keep the anchor's phase, before and after the anchor
            (
                60,
                ts(utc(2026, 3, 1, 12, 0, 7)),
                utc(2026, 3, 1, 12, 30, 0),
                utc(2026, 3, 1, 12, 30, 7),
            ),
            (
                60,
                ts(utc(2026, 3, 1, 12, 0, 7)),
                utc(2026, 3, 1, 11, 0, 0),
                utc(2026, 3, 1, 11, 0, 7),
            ),
            (
                60,
                ts(utc(2026, 3, 1, 12, 0, 7)),
                utc(2026, 3, 1, 12, 0, 7),
                utc(2026, 3, 1, 12, 1, 7),
            ),
            (300, ts(utc(2030, 1, 1, 0, 2)), utc(2026, 3, 1, 12, 0, 0), utc(2026, 3, 1, 12, 2, 0)),
            # fractional interval and anchor
            (
                0.25,
                ts(utc(2026, 3, 1, 0, 0, 0, 100000)),
                utc(2026, 3, 1, 0, 0, 1),
                utc(2026, 3, 1, 0, 0, 1, 100000),
            ),
            (1.5, 0.0, utc(2026, 3, 1, 0, 0, 0, 500000), utc(2026, 3, 1, 0, 0, 1, 500000)),
            # before the epoch
            (7, 0.0, utc(1969, 12, 31, 23, 59, 50), utc(1969, 12, 31, 23, 59, 53)),
        ],
    )
    def test_next_after(
        self, interval: float, anchor: float, after: datetime, expected: datetime
    ) -> None:
        assert Every(interval, anchor).next_after(ts(after)) == ts(expected)

    @pytest.mark.parametrize(
        ("interval", "anchor", "after", "expected"),
        [
            # (after - anchor) / interval rounds below the integer: the naive guess is `after`
            # itself, which must not be returned.
            (
                0.1,
                ts(NEW_YEAR),
                ts(utc(2026, 1, 1, 0, 0, 0, 100000)),
                utc(2026, 1, 1, 0, 0, 0, 200000),
            ),
            (
                0.3,
                ts(NEW_YEAR),
                ts(utc(2026, 1, 1, 0, 0, 0, 600000)),
                utc(2026, 1, 1, 0, 0, 0, 900000),
            ),
            (
                0.7,
                ts(NEW_YEAR),
                ts(utc(2026, 1, 1, 0, 0, 2, 100000)),
                utc(2026, 1, 1, 0, 0, 2, 800000),
            ),
            # The quotient rounds up to the integer: the naive guess skips a whole tick.
            (
                0.7,
                0.0,
                below(utc(1970, 1, 6, 20, 8, 12, 800000)),
                utc(1970, 1, 6, 20, 8, 12, 800000),
            ),
            (2.3, 0.0, below(utc(1970, 5, 5, 21, 56, 52)), utc(1970, 5, 5, 21, 56, 52)),
            (
                0.3,
                0.0,
                below(utc(1970, 2, 1, 12, 13, 39, 600000)),
                utc(1970, 2, 1, 12, 13, 39, 600000),
            ),
        ],
    )
    def test_float_rounding(
        self, interval: float, anchor: float, after: float, expected: datetime
    ) -> None:
        assert Every(interval, anchor).next_after(after) == ts(expected)

    @pytest.mark.parametrize(
        ("interval", "anchor", "expected"),
        [
            (0.1, NEW_YEAR, utc(2026, 1, 2, 3, 46, 40)),
            (30, NEW_YEAR, utc(2026, 12, 14, 5, 20)),
            (0.25, utc(2026, 1, 1, 0, 0, 0, 500000), utc(2026, 1, 3, 21, 26, 40, 500000)),
        ],
    )
    def test_no_drift_over_a_million_steps(
        self, interval: float, anchor: datetime, expected: datetime
    ) -> None:
        every = Every(interval, ts(anchor))
        tick = ts(anchor)
        for _ in range(10**6):
            following = every.next_after(tick)
            assert following > tick
            tick = following
        assert tick == ts(expected)

    def test_interval_below_float_resolution_still_advances(self) -> None:
        after = ts(NEW_YEAR)
        # 1e-12 s is far below the ~0.24 us spacing of floats near 2026: ticks collapse, and
        # the answer is the first float above `after`.
        assert Every(1e-12).next_after(after) == math.nextafter(after, math.inf)

    @pytest.mark.parametrize("interval", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf])
    def test_bad_interval(self, interval: float) -> None:
        with pytest.raises(ValueError, match="interval must be a finite number of seconds > 0"):
            Every(interval)

    @pytest.mark.parametrize("anchor", [math.nan, math.inf])
    def test_bad_anchor(self, anchor: float) -> None:
        with pytest.raises(ValueError, match="anchor must be a finite epoch time"):
            Every(30, anchor)

    @pytest.mark.parametrize(
        ("every", "text"),
        [
            (Every(30), "every 30s"),
            (Every(0.25), "every 250ms"),
            (Every(1.5), "every 1.5s"),
            (Every(5400), "every 1h30m"),
            (Every(86400), "every 1d"),
            (Every(60, ts(utc(2026, 3, 1, 12, 0, 7))), "every 1m from 2026-03-01T12:00:07+00:00"),
        ],
    )
    def test_describe(self, every: Every, text: str) -> None:
        assert every.describe() == text

    def test_equal_whether_int_or_float(self) -> None:
        assert Every(30) == Every(30.0, 0)
        assert hash(Every(30)) == hash(Every(30.0, 0))
        assert Every(30) != Every(30, 1)


class TestEveryOffset:
    """Every with an offset: ticks at offset + k * interval, a fixed phase in the interval."""

    @pytest.mark.parametrize(
        ("interval", "offset", "after", "expected"),
        [
            (60, 15.0, utc(2026, 3, 1, 12, 0, 10), utc(2026, 3, 1, 12, 0, 15)),
            (60, 15.0, utc(2026, 3, 1, 12, 0, 15), utc(2026, 3, 1, 12, 1, 15)),
            (60, 15.0, utc(2026, 3, 1, 12, 0, 20), utc(2026, 3, 1, 12, 1, 15)),
            (1, 0.25, utc(2026, 3, 1, 12, 0, 0), utc(2026, 3, 1, 12, 0, 0, 250_000)),
            (
                1,
                0.25,
                below(utc(2026, 3, 1, 12, 0, 0, 250_000)),
                utc(2026, 3, 1, 12, 0, 0, 250_000),
            ),
            (3600, 3599.5, utc(2026, 3, 1, 12), utc(2026, 3, 1, 12, 59, 59, 500_000)),
            (86400, 0.0, utc(2026, 3, 1), utc(2026, 3, 2)),  # no offset: today's ticks
        ],
    )
    def test_next_after(
        self, interval: float, offset: float, after: datetime | float, expected: datetime
    ) -> None:
        start = after if isinstance(after, float) else ts(after)
        fire = Every(interval, offset=offset).next_after(start)
        assert fire == ts(expected)

    def test_ticks_keep_the_phase_far_from_the_epoch(self) -> None:
        trigger = Every(60, offset=43.343)
        fires = upcoming(trigger, ts(utc(2026, 12, 3, 8)), 1000)
        assert all(b - a == pytest.approx(60) for a, b in itertools.pairwise(fires))
        assert {round(f % 60, 3) for f in fires} == {43.343}

    @pytest.mark.parametrize("offset", [-1.0, 60.0, 61.0, math.inf, math.nan])
    def test_offset_outside_the_interval_is_refused(self, offset: float) -> None:
        with pytest.raises(ValueError, match="offset"):
            Every(60, offset=offset)

    def test_describe_shows_the_offset(self) -> None:
        assert Every(60, offset=15).describe() == "every 1m offset 15s"
        assert Every(1, offset=0.25).describe() == "every 1s offset 250ms"


class TestStableOffset:
    """offset = "auto": a phase from the job name, the same on every host and every run."""

    def test_pinned_values(self) -> None:
        # Pinned: a change here moves the ticks of every "auto" job in every fleet.
        assert stable_offset("a", 60) == 43.343
        assert stable_offset("backup", 3600) == stable_offset("backup", 3600)

    def test_within_the_interval_in_whole_milliseconds(self) -> None:
        for n in range(500):
            offset = stable_offset(f"job-{n}", 1.5)
            assert 0 <= offset < 1.5
            assert offset == round(offset * 1000) / 1000

    def test_names_spread_over_the_interval(self) -> None:
        phases = {int(stable_offset(f"job-{n}", 60) // 6) for n in range(200)}
        assert phases == set(range(10))  # every tenth of the minute gets some of 200 jobs

    def test_an_interval_under_a_millisecond_has_no_offset(self) -> None:
        assert stable_offset("a", 0.0005) == 0.0


class TestAt:
    """At: one fire at `when`, then never again."""

    WHEN = utc(2026, 12, 1, 10, 0)

    @pytest.mark.parametrize(
        ("after", "expected"),
        [
            (utc(2026, 1, 1), utc(2026, 12, 1, 10, 0)),
            (utc(2026, 12, 1, 9, 59, 59, 999999), utc(2026, 12, 1, 10, 0)),
            (utc(2026, 12, 1, 10, 0), None),
            (utc(2027, 1, 1), None),
        ],
    )
    def test_next_after(self, after: datetime, expected: datetime | None) -> None:
        fire = At(ts(self.WHEN)).next_after(ts(after))
        assert fire == (None if expected is None else ts(expected))

    def test_describe(self) -> None:
        assert At(ts(self.WHEN)).describe() == "at 2026-12-01T10:00:00+00:00"

    @pytest.mark.parametrize("when", [math.nan, math.inf])
    def test_bad_when(self, when: float) -> None:
        with pytest.raises(ValueError, match="when must be a finite epoch time"):
            At(when)


class TestUpcoming:
    """upcoming(): the next n fire times, fewer when the trigger stops."""

    @pytest.mark.parametrize(
        ("trigger", "after", "n", "expected"),
        [
            (
                Every(900),
                utc(2026, 3, 1, 12, 10),
                3,
                [utc(2026, 3, 1, 12, 15), utc(2026, 3, 1, 12, 30), utc(2026, 3, 1, 12, 45)],
            ),
            (
                Cron("0 9 * * MON-FRI", BERLIN),
                utc(2026, 3, 6, 12, 0),
                3,
                [
                    utc(2026, 3, 9, 8, 0),  # Mon 09:00 CET
                    utc(2026, 3, 10, 8, 0),
                    utc(2026, 3, 11, 8, 0),
                ],
            ),
            (At(ts(utc(2026, 12, 1, 10, 0))), utc(2026, 1, 1), 5, [utc(2026, 12, 1, 10, 0)]),
            (At(ts(utc(2026, 12, 1, 10, 0))), utc(2027, 1, 1), 5, []),
            (Every(900), utc(2026, 3, 1, 12, 10), 0, []),
        ],
    )
    def test_upcoming(
        self, trigger: Trigger, after: datetime, n: int, expected: list[datetime]
    ) -> None:
        assert as_utc(upcoming(trigger, ts(after), n)) == expected

    def test_negative_n(self) -> None:
        with pytest.raises(ValueError, match="n must be >= 0"):
            upcoming(Every(1), 0.0, -1)

    @pytest.mark.parametrize("trigger", [Every(1), Cron("* * * * *", ZONE_UTC), At(1.0)])
    def test_triggers_satisfy_the_protocol(self, trigger: Trigger) -> None:
        assert isinstance(trigger, Trigger)


class TestCron:
    """Cron: 5-field expressions in zones without a DST change nearby."""

    @pytest.mark.parametrize(
        ("expr", "tz", "after", "expected"),
        [
            (
                "*/15 * * * *",
                ZONE_UTC,
                utc(2026, 3, 1, 12, 7, 30),
                [utc(2026, 3, 1, 12, 15), utc(2026, 3, 1, 12, 30)],
            ),
            # after exactly on a fire time: the next one
            ("*/15 * * * *", ZONE_UTC, utc(2026, 3, 1, 12, 15), [utc(2026, 3, 1, 12, 30)]),
            # just before a fire time, with a fraction of a second
            (
                "0 3 * * *",
                ZONE_UTC,
                utc(2026, 3, 1, 2, 59, 59, 999000),
                [utc(2026, 3, 1, 3, 0), utc(2026, 3, 2, 3, 0)],
            ),
            (
                "0 3 * * *",
                BERLIN,
                utc(2026, 1, 15),
                [
                    utc(2026, 1, 15, 2, 0),  # 03:00 CET
                    utc(2026, 1, 16, 2, 0),
                ],
            ),
            (
                "0 3 * * *",
                BERLIN,
                utc(2026, 7, 15),
                [
                    utc(2026, 7, 15, 1, 0),  # 03:00 CEST
                    utc(2026, 7, 16, 1, 0),
                ],
            ),
            (
                "30 8 * * *",
                NEW_YORK,
                utc(2026, 1, 15),
                [
                    utc(2026, 1, 15, 13, 30),  # 08:30 EST
                    utc(2026, 1, 16, 13, 30),
                ],
            ),
            (
                "30 8 * * *",
                NEW_YORK,
                utc(2026, 7, 15),
                [
                    utc(2026, 7, 15, 12, 30),  # 08:30 EDT
                    utc(2026, 7, 16, 12, 30),
                ],
            ),
            (
                "0 9 * * *",
                LORD_HOWE,
                utc(2026, 1, 15),
                [
                    utc(2026, 1, 15, 22, 0),  # 09:00 +11:00
                    utc(2026, 1, 16, 22, 0),
                ],
            ),
            (
                "0 9 * * *",
                LORD_HOWE,
                utc(2026, 7, 15),
                [
                    utc(2026, 7, 15, 22, 30),  # 09:00 +10:30
                    utc(2026, 7, 16, 22, 30),
                ],
            ),
            # day-of-week and day-of-month: names, ranges, L and #n
            (
                "0 9 * * MON-FRI",
                ZONE_UTC,
                utc(2026, 3, 6, 10, 0),
                [utc(2026, 3, 9, 9, 0), utc(2026, 3, 10, 9, 0)],
            ),
            ("0 0 L * *", ZONE_UTC, utc(2026, 2, 1), [utc(2026, 2, 28), utc(2026, 3, 31)]),
            (
                "0 12 * * fri#2",
                ZONE_UTC,
                utc(2026, 3, 1),
                [utc(2026, 3, 13, 12, 0), utc(2026, 4, 10, 12, 0)],
            ),
            # both day fields restricted: either may match (Debian cron's OR)
            (
                "0 0 13 * 5",
                ZONE_UTC,
                utc(2026, 3, 1),
                [utc(2026, 3, 6), utc(2026, 3, 13), utc(2026, 3, 20)],
            ),
            ("0 0 29 2 *", ZONE_UTC, utc(2026, 3, 1), [utc(2028, 2, 29), utc(2032, 2, 29)]),
            # extra whitespace is fine
            ("  0   3 * *  * ", ZONE_UTC, utc(2026, 3, 1), [utc(2026, 3, 1, 3, 0)]),
        ],
    )
    def test_upcoming(
        self, expr: str, tz: ZoneInfo, after: datetime, expected: list[datetime]
    ) -> None:
        assert as_utc(upcoming(Cron(expr, tz), ts(after), len(expected))) == expected

    @pytest.mark.parametrize(
        ("expr", "after"),
        [("0 0 1 1 *", utc(9999, 6, 1)), ("*/5 * * * *", utc(9999, 12, 31, 23, 58))],
    )
    def test_nothing_after_year_9999(self, expr: str, after: datetime) -> None:
        assert Cron(expr, BERLIN).next_after(ts(after)) is None

    @pytest.mark.parametrize(
        ("cron", "text"),
        [
            (Cron("0 3 * * *", BERLIN), "cron '0 3 * * *' Europe/Berlin"),
            (Cron(" */5  * * * * ", ZONE_UTC), "cron '*/5 * * * *' UTC"),
            (Cron("@daily", NEW_YORK), "cron '@daily' America/New_York"),
        ],
    )
    def test_describe(self, cron: Cron, text: str) -> None:
        assert cron.describe() == text

    def test_equality(self) -> None:
        assert Cron("0 3 * * *", BERLIN) == Cron("0  3 * * *", BERLIN)
        assert hash(Cron("0 3 * * *", BERLIN)) == hash(Cron("0  3 * * *", BERLIN))
        assert Cron("0 3 * * *", BERLIN) != Cron("0 3 * * *", NEW_YORK)


class TestCronNicknames:
    """Cron nicknames are aliases of 5-field expressions; @reboot points to on = "startup"."""

    AFTER = utc(2026, 3, 4, 12, 30)  # a Wednesday

    @pytest.mark.parametrize(
        ("nickname", "expected"),
        [
            ("@yearly", [utc(2027, 1, 1), utc(2028, 1, 1)]),
            ("@annually", [utc(2027, 1, 1), utc(2028, 1, 1)]),
            ("@monthly", [utc(2026, 4, 1), utc(2026, 5, 1)]),
            ("@weekly", [utc(2026, 3, 8), utc(2026, 3, 15)]),
            ("@daily", [utc(2026, 3, 5), utc(2026, 3, 6)]),
            ("@midnight", [utc(2026, 3, 5), utc(2026, 3, 6)]),
            ("@hourly", [utc(2026, 3, 4, 13, 0), utc(2026, 3, 4, 14, 0)]),
            ("@DAILY", [utc(2026, 3, 5), utc(2026, 3, 6)]),
        ],
    )
    def test_nickname(self, nickname: str, expected: list[datetime]) -> None:
        assert as_utc(upcoming(Cron(nickname, ZONE_UTC), ts(self.AFTER), 2)) == expected

    def test_daily_is_local_midnight(self) -> None:
        fires = upcoming(Cron("@daily", BERLIN), ts(self.AFTER), 1)
        assert as_utc(fires) == [utc(2026, 3, 4, 23, 0)]  # 00:00 CET

    def test_reboot(self) -> None:
        with pytest.raises(ValueError, match='use on = "startup"'):
            Cron("@reboot", ZONE_UTC)

    def test_unknown_nickname(self) -> None:
        with pytest.raises(ValueError, match="unknown nickname '@fortnightly'; known: @yearly"):
            Cron("@fortnightly", ZONE_UTC)


class TestCronSeconds:
    """6-field expressions: a leading seconds field on top of the 5-field schedule."""

    @pytest.mark.parametrize(
        ("expr", "after", "expected"),
        [
            (
                "*/20 * * * * *",
                utc(2026, 3, 1, 12, 0, 5),
                [utc(2026, 3, 1, 12, 0, 20), utc(2026, 3, 1, 12, 0, 40), utc(2026, 3, 1, 12, 1, 0)],
            ),
            (
                "* * * * * *",
                utc(2026, 3, 1, 12, 0, 59, 500000),
                [utc(2026, 3, 1, 12, 1, 0), utc(2026, 3, 1, 12, 1, 1)],
            ),
            (
                "5,10 0 3 * * *",
                utc(2026, 3, 1),
                [utc(2026, 3, 1, 3, 0, 5), utc(2026, 3, 1, 3, 0, 10), utc(2026, 3, 2, 3, 0, 5)],
            ),
            # after exactly on a fire second, and between two in the same minute
            (
                "5,10 0 3 * * *",
                utc(2026, 3, 1, 3, 0, 5),
                [utc(2026, 3, 1, 3, 0, 10), utc(2026, 3, 2, 3, 0, 5)],
            ),
            ("5,10 0 3 * * *", utc(2026, 3, 1, 3, 0, 7, 250000), [utc(2026, 3, 1, 3, 0, 10)]),
            (
                "0-10/5 30 * * * *",
                utc(2026, 3, 1, 12, 29, 59),
                [
                    utc(2026, 3, 1, 12, 30, 0),
                    utc(2026, 3, 1, 12, 30, 5),
                    utc(2026, 3, 1, 12, 30, 10),
                    utc(2026, 3, 1, 13, 30, 0),
                ],
            ),
            (
                "45-59 * * * * *",
                utc(2026, 3, 1, 12, 0, 58),
                [utc(2026, 3, 1, 12, 0, 59), utc(2026, 3, 1, 12, 1, 45)],
            ),
            # "N/S" means N-59/S, as in cronsim's other fields
            (
                "40/7 0 0 * * *",
                utc(2026, 3, 1),
                [
                    utc(2026, 3, 1, 0, 0, 40),
                    utc(2026, 3, 1, 0, 0, 47),
                    utc(2026, 3, 1, 0, 0, 54),
                    utc(2026, 3, 2, 0, 0, 40),
                ],
            ),
            (
                "59,0 0 0 * * *",
                utc(2026, 3, 1),
                [utc(2026, 3, 1, 0, 0, 59), utc(2026, 3, 2, 0, 0, 0)],
            ),
        ],
    )
    def test_upcoming(self, expr: str, after: datetime, expected: list[datetime]) -> None:
        assert as_utc(upcoming(Cron(expr, ZONE_UTC), ts(after), len(expected))) == expected

    @pytest.mark.parametrize(
        ("seconds", "message"),
        [
            ("60", "'60' is out of range (seconds are 0-59)"),
            ("0-60", "'0-60' is out of range (seconds are 0-59)"),
            ("*/0", "the step in '*/0' must be at least 1"),
            ("30-10", "the range '30-10' runs backwards"),
            ("a", "cannot read 'a'"),
            ("1,,2", "cannot read ''"),
            ("*/", "cannot read '*/'"),
            ("-5", "cannot read '-5'"),
            ("5-", "cannot read '5-'"),
            ("L", "cannot read 'L'"),
            ("٣", "cannot read '٣'"),  # an Arabic-Indic digit is not a number here
        ],
    )
    def test_bad_seconds(self, seconds: str, message: str) -> None:
        with pytest.raises(
            ValueError, match="^" + re.escape(f"second field {seconds!r}: {message}")
        ):
            Cron(f"{seconds} * * * * *", ZONE_UTC)


class TestCronErrors:
    """A bad expression raises ValueError naming the field and text at fault."""

    @pytest.mark.parametrize(
        ("expr", "message"),
        [
            ("", "expected 5 fields .* or 6 with seconds first, got 0"),
            ("* * * *", "expected 5 fields .* or 6 with seconds first, got 4"),
            ("0 0 0 * * * *", "expected 5 fields .* or 6 with seconds first, got 7"),
            ("61 * * * *", "bad minute field '61' \\(allowed: 0-59;"),
            ("0 24 * * *", "bad hour field '24' \\(allowed: 0-23;"),
            ("0 0 0 * *", "bad day-of-month field '0' \\(allowed: 1-31, L or LW;"),
            ("0 0 * 13 *", "bad month field '13' \\(allowed: 1-12 or JAN-DEC;"),
            ("0 0 * * 8", "bad day-of-week field '8' \\(allowed: 0-7 or SUN-SAT"),
            ("*/0 * * * *", "bad minute field '\\*/0'"),
            ("5-1 * * * *", "bad minute field '5-1'"),
            ("0 0 * * MON#6", "bad day-of-week field 'MON#6'"),
            ("0 0 31 2 *", "day-of-month '31' never occurs in month '2'"),
            ("0 0 31 APR,JUN *", "day-of-month '31' never occurs in month 'APR,JUN'"),
            ("0 60 * * * *", "bad minute field '60'"),
            ("60 0 * * * *", "second field '60': '60' is out of range"),
            ("@reboot", '@reboot is not a schedule; use on = "startup" instead'),
        ],
    )
    def test_message(self, expr: str, message: str) -> None:
        with pytest.raises(ValueError, match=f"^{message}"):
            Cron(expr, ZONE_UTC)


# (zone, expression, after, expected fire times in UTC). Comments: local wall-clock times.
DST_CASES = [
    # --- spring forward: Europe/Berlin 2026-03-29, 02:00 CET -> 03:00 CEST (01:00 UTC)
    pytest.param(
        BERLIN,
        "30 2 * * *",
        utc(2026, 3, 28, 12, 0),
        [
            utc(2026, 3, 29, 1, 0),  # 02:30 skipped -> 03:00 CEST
            utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        ],
        id="berlin-gap-fixed",
    ),
    pytest.param(
        BERLIN,
        "15,45 2 * * *",
        utc(2026, 3, 28, 12, 0),
        [
            utc(2026, 3, 29, 1, 0),  # 02:15 and 02:45 collapse into 03:00 CEST
            utc(2026, 3, 30, 0, 15),
            utc(2026, 3, 30, 0, 45),
        ],
        id="berlin-gap-collapse",
    ),
    pytest.param(
        BERLIN,
        "0,30 2,3 * * *",
        utc(2026, 3, 28, 12, 0),
        [
            utc(2026, 3, 29, 1, 0),  # 02:00, 02:30 and 03:00 -> one run 03:00
            utc(2026, 3, 29, 1, 30),  # 03:30 CEST
            utc(2026, 3, 30, 0, 0),  # 02:00 CEST
        ],
        id="berlin-gap-and-after",
    ),
    pytest.param(
        BERLIN,
        "*/15 * * * *",
        utc(2026, 3, 29, 0, 30),
        [
            utc(2026, 3, 29, 0, 45),  # 01:45 CET
            utc(2026, 3, 29, 1, 0),  # 03:00 CEST
            utc(2026, 3, 29, 1, 15),  # 03:15 CEST
        ],
        id="berlin-gap-wildcard",
    ),
    pytest.param(
        BERLIN,
        "0 * * * *",
        utc(2026, 3, 28, 23, 30),
        [
            utc(2026, 3, 29, 0, 0),  # 01:00 CET
            utc(2026, 3, 29, 1, 0),  # 03:00 CEST
            utc(2026, 3, 29, 2, 0),  # 04:00 CEST
        ],
        id="berlin-gap-hourly",
    ),
    pytest.param(
        BERLIN,
        "*/30 2 * * *",
        utc(2026, 3, 28, 12, 0),
        [
            utc(2026, 3, 30, 0, 0),  # no 02:xx on the 29th at all
            utc(2026, 3, 30, 0, 30),
        ],
        id="berlin-gap-wildcard-minute",
    ),
    # --- fall back: Europe/Berlin 2026-10-25, 03:00 CEST -> 02:00 CET (01:00 UTC)
    pytest.param(
        BERLIN,
        "30 2 * * *",
        utc(2026, 10, 24, 12, 0),
        [
            utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first of two
            utc(2026, 10, 26, 1, 30),  # 02:30 CET
        ],
        id="berlin-repeat-fixed",
    ),
    pytest.param(
        BERLIN,
        "30 2 * * *",
        utc(2026, 10, 25, 1, 0),  # 02:00 CET
        [utc(2026, 10, 26, 1, 30)],  # not 02:30 CET today: it already ran
        id="berlin-repeat-fixed-start-inside",
    ),
    pytest.param(
        BERLIN,
        "0 * * * *",
        utc(2026, 10, 24, 23, 30),
        [
            utc(2026, 10, 25, 0, 0),  # 02:00 CEST
            utc(2026, 10, 25, 1, 0),  # 02:00 CET
            utc(2026, 10, 25, 2, 0),  # 03:00 CET
        ],
        id="berlin-repeat-hourly",
    ),
    pytest.param(
        BERLIN,
        "0 0-23 * * *",
        utc(2026, 10, 24, 23, 30),
        [
            utc(2026, 10, 25, 0, 0),  # 02:00 CEST; same hours, fixed-time rule
            utc(2026, 10, 25, 2, 0),  # 03:00 CET
            utc(2026, 10, 25, 3, 0),  # 04:00 CET
        ],
        id="berlin-repeat-hour-range",
    ),
    pytest.param(
        BERLIN,
        "*/15 * * * *",
        utc(2026, 10, 25, 0, 40),
        [
            utc(2026, 10, 25, 0, 45),  # 02:45 CEST
            utc(2026, 10, 25, 1, 0),  # 02:00 CET
            utc(2026, 10, 25, 1, 15),  # 02:15 CET
        ],
        id="berlin-repeat-wildcard",
    ),
    pytest.param(
        BERLIN,
        "*/30 2 * * *",
        utc(2026, 10, 24, 12, 0),
        [
            utc(2026, 10, 25, 0, 0),  # 02:00 CEST
            utc(2026, 10, 25, 0, 30),  # 02:30 CEST
            utc(2026, 10, 25, 1, 0),  # 02:00 CET
            utc(2026, 10, 25, 1, 30),  # 02:30 CET
            utc(2026, 10, 26, 1, 0),  # 02:00 CET
        ],
        id="berlin-repeat-wildcard-minute",
    ),
    # --- spring forward: America/New_York 2026-03-08, 02:00 EST -> 03:00 EDT (07:00 UTC)
    pytest.param(
        NEW_YORK,
        "30 2 * * *",
        utc(2026, 3, 7, 17, 0),
        [
            utc(2026, 3, 8, 7, 0),  # 02:30 skipped -> 03:00 EDT
            utc(2026, 3, 9, 6, 30),  # 02:30 EDT
        ],
        id="new-york-gap-fixed",
    ),
    pytest.param(
        NEW_YORK,
        "*/15 * * * *",
        utc(2026, 3, 8, 6, 40),
        [
            utc(2026, 3, 8, 6, 45),  # 01:45 EST
            utc(2026, 3, 8, 7, 0),  # 03:00 EDT
            utc(2026, 3, 8, 7, 15),  # 03:15 EDT
        ],
        id="new-york-gap-wildcard",
    ),
    # --- fall back: America/New_York 2026-11-01, 02:00 EDT -> 01:00 EST (06:00 UTC)
    pytest.param(
        NEW_YORK,
        "30 1 * * *",
        utc(2026, 10, 31, 16, 0),
        [
            utc(2026, 11, 1, 5, 30),  # 01:30 EDT, the first of two
            utc(2026, 11, 2, 6, 30),  # 01:30 EST
        ],
        id="new-york-repeat-fixed",
    ),
    pytest.param(
        NEW_YORK,
        "30 1 * * *",
        utc(2026, 11, 1, 6, 0),  # 01:00 EST
        [utc(2026, 11, 2, 6, 30)],
        id="new-york-repeat-fixed-start-inside",
    ),
    pytest.param(
        NEW_YORK,
        "0 * * * *",
        utc(2026, 11, 1, 4, 30),
        [
            utc(2026, 11, 1, 5, 0),  # 01:00 EDT
            utc(2026, 11, 1, 6, 0),  # 01:00 EST
            utc(2026, 11, 1, 7, 0),  # 02:00 EST
        ],
        id="new-york-repeat-hourly",
    ),
    # --- Australia/Lord_Howe shifts by 30 minutes:
    # 2026-10-04 02:00 +10:30 -> 02:30 +11:00 (15:30 UTC on the 3rd);
    # 2026-04-05 02:00 +11:00 -> 01:30 +10:30 (15:00 UTC on the 4th).
    pytest.param(
        LORD_HOWE,
        "15 2 * * *",
        utc(2026, 10, 3, 0, 0),
        [
            utc(2026, 10, 3, 15, 30),  # 02:15 skipped -> 02:30 +11:00
            utc(2026, 10, 4, 15, 15),  # 02:15 +11:00
        ],
        id="lord-howe-gap-fixed",
    ),
    pytest.param(
        LORD_HOWE,
        "*/15 * * * *",
        utc(2026, 10, 3, 15, 10),
        [
            utc(2026, 10, 3, 15, 15),  # 01:45 +10:30
            utc(2026, 10, 3, 15, 30),  # 02:30 +11:00
            utc(2026, 10, 3, 15, 45),  # 02:45 +11:00
        ],
        id="lord-howe-gap-wildcard",
    ),
    pytest.param(
        LORD_HOWE,
        "*/20 23 * * *",
        utc(2026, 10, 3, 12, 0),
        [
            utc(2026, 10, 3, 12, 30),  # 23:00 +10:30
            utc(2026, 10, 3, 12, 50),
            utc(2026, 10, 3, 13, 10),
            utc(2026, 10, 4, 12, 0),  # 23:00 +11:00 (cronsim loses it)
            utc(2026, 10, 4, 12, 20),  # 23:20 +11:00 (cronsim loses it)
            utc(2026, 10, 4, 12, 40),
        ],
        id="lord-howe-gap-wildcard-minute-next-day",
    ),
    pytest.param(
        LORD_HOWE,
        "45 1 * * *",
        utc(2026, 4, 4, 0, 0),
        [
            utc(2026, 4, 4, 14, 45),  # 01:45 +11:00, the first of two
            utc(2026, 4, 5, 15, 15),  # 01:45 +10:30
        ],
        id="lord-howe-repeat-fixed",
    ),
    pytest.param(
        LORD_HOWE,
        "*/15 * * * *",
        utc(2026, 4, 4, 14, 20),
        [
            utc(2026, 4, 4, 14, 30),  # 01:30 +11:00
            utc(2026, 4, 4, 14, 45),  # 01:45 +11:00
            utc(2026, 4, 4, 15, 0),  # 01:30 +10:30
            utc(2026, 4, 4, 15, 15),  # 01:45 +10:30
            utc(2026, 4, 4, 15, 30),  # 02:00 +10:30
        ],
        id="lord-howe-repeat-wildcard",
    ),
    pytest.param(
        LORD_HOWE,
        "*/15 2 * * *",
        utc(2026, 4, 4, 12, 0),
        [
            utc(2026, 4, 4, 15, 30),  # 02:00 +10:30 (cronsim loses it)
            utc(2026, 4, 4, 15, 45),  # 02:15 +10:30 (cronsim loses it)
            utc(2026, 4, 4, 16, 0),  # 02:30 +10:30
            utc(2026, 4, 4, 16, 15),  # 02:45 +10:30
        ],
        id="lord-howe-repeat-wildcard-minute",
    ),
    # --- Pacific/Chatham falls back at 03:45 +13:45 -> 02:45 +12:45 (14:00 UTC on 2026-04-04)
    pytest.param(
        CHATHAM,
        "*/15 2 * * *",
        utc(2026, 4, 4, 12, 0),
        [
            utc(2026, 4, 4, 12, 15),  # 02:00 +13:45
            utc(2026, 4, 4, 12, 30),
            utc(2026, 4, 4, 12, 45),
            utc(2026, 4, 4, 13, 0),  # 02:45 +13:45
            utc(2026, 4, 4, 14, 0),  # 02:45 +12:45 (cronsim loses it)
            utc(2026, 4, 5, 13, 15),  # 02:00 +12:45 next day
        ],
        id="chatham-repeat-wildcard-minute",
    ),
    # --- 6 fields follow the same rule as their 5-field form
    pytest.param(
        BERLIN,
        "0 30 2 * * *",
        utc(2026, 3, 28, 12, 0),
        [
            utc(2026, 3, 29, 1, 0),  # 03:00 CEST, like "30 2 * * *"
            utc(2026, 3, 30, 0, 30),
        ],
        id="berlin-gap-seconds",
    ),
    pytest.param(
        BERLIN,
        "10 30 2 * * *",
        utc(2026, 3, 28, 12, 0),
        [utc(2026, 3, 29, 1, 0, 10)],  # 03:00:10 CEST
        id="berlin-gap-seconds-offset",
    ),
    pytest.param(
        BERLIN,
        "*/20 30 2 * * *",
        utc(2026, 10, 24, 12, 0),
        [
            utc(2026, 10, 25, 0, 30, 0),  # 02:30:00 CEST
            utc(2026, 10, 25, 0, 30, 20),
            utc(2026, 10, 25, 0, 30, 40),
            utc(2026, 10, 26, 1, 30, 0),  # 02:30:00 CET
        ],
        id="berlin-repeat-seconds",
    ),
    # --- UTC has no DST: nothing moves
    pytest.param(
        ZONE_UTC,
        "30 2 * * *",
        utc(2026, 3, 28, 12, 0),
        [utc(2026, 3, 29, 2, 30), utc(2026, 3, 30, 2, 30)],
        id="utc",
    ),
]


class TestCronDst:
    """The DST rule: exact UTC instants around gaps and repeats in several zones."""

    @pytest.mark.parametrize(("tz", "expr", "after", "expected"), DST_CASES)
    def test_upcoming(
        self, tz: ZoneInfo, expr: str, after: datetime, expected: list[datetime]
    ) -> None:
        assert as_utc(upcoming(Cron(expr, tz), ts(after), len(expected))) == expected

    @pytest.mark.parametrize(("tz", "expr", "after", "expected"), DST_CASES)
    def test_fresh_start_at_each_answer(
        self, tz: ZoneInfo, expr: str, after: datetime, expected: list[datetime]
    ) -> None:
        # A new Cron (no cached iterator) asked from each previous answer, or from just
        # before each answer, agrees with the chained walk.
        starts = [ts(after)] + [ts(e) for e in expected[:-1]]
        for start, want in zip(starts, expected, strict=True):
            assert Cron(expr, tz).next_after(start) == ts(want)
            assert Cron(expr, tz).next_after(ts(want) - 0.5) == ts(want)


class TestCronCache:
    """The cached iterator gives the same answers as a fresh Cron, whatever is asked."""

    @pytest.mark.parametrize(
        ("tz", "expr"),
        [
            (BERLIN, "30 2 * * *"),
            (BERLIN, "*/7 * * * *"),
            (BERLIN, "15,45 */2 * * *"),
            (NEW_YORK, "*/20 30 1 * * *"),
            (LORD_HOWE, "*/10 * * * *"),
            (LORD_HOWE, "*/15 2 * * *"),
        ],
    )
    def test_same_as_fresh(self, tz: ZoneInfo, expr: str) -> None:
        cron = Cron(expr, tz)
        # Around the 2026 transitions of all three zones, ask in an order that mixes cache
        # hits (the previous answer, the same question again) with jumps back and forward.
        for day in (utc(2026, 3, 28), utc(2026, 10, 24), utc(2026, 4, 3), utc(2026, 11, 1)):
            after = ts(day)
            for step in range(400):
                fire = cron.next_after(after)
                assert fire is not None
                assert fire == Cron(expr, tz).next_after(after)
                assert cron.next_after(after) == fire
                if step % 10 == 0:
                    after -= 1234.5
                elif step % 10 == 5:
                    after += 1234.5
                else:
                    after = fire
