"""Table tests for taskd.schedule.decide: the due ticks, and what catchup and grace make of them.

The expectations come from the README ("Catch-up, grace, overlap"): ``latest`` runs the newest
due tick and skips the rest, ``all`` runs the newest 1000 oldest first, ``none`` runs the newest
only if it is at most ``grace`` late; a skipped tick within ``grace`` is coalesced, an older one
missed, and both are paused on the first handling after a resume. A run later than ``grace``
has the cause ``catchup``, others ``schedule``. The first table is the design's (issue 10 §3)
and keeps its row numbers; times there are plain seconds, other tests use real dates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from taskd.config.model import Catchup
from taskd.run.events import Cause, SkipReason
from taskd.schedule.decide import MAX_CATCHUP, MAX_STEPS, Decision, Span, decide, due_ticks
from taskd.schedule.triggers import Cron, Every

SCHEDULE, CATCHUP = Cause.SCHEDULE, Cause.CATCHUP
MISSED, COALESCED, PAUSED = SkipReason.MISSED, SkipReason.COALESCED, SkipReason.PAUSED
GRACE = 30.0  # the table's grace, with every = 60s unless a row says otherwise

BERLIN = ZoneInfo("Europe/Berlin")
ZONE_UTC = ZoneInfo("UTC")


def ticks(first: float, last: float, step: float = 60.0) -> list[float]:
    """The ticks first, first + step, ... up to last (inclusive), as the scheduler has them."""
    return [first + k * step for k in range(round((last - first) / step) + 1)]


def runs(*groups: tuple[Sequence[float], Cause]) -> tuple[tuple[float, Cause], ...]:
    """Decision.run written as groups of ticks sharing a cause, oldest first."""
    return tuple((t, cause) for group, cause in groups for t in group)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    """A UTC instant in epoch seconds: utc(2026, 3, 29, 1) is 2026-03-29T01:00:00Z."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def case(
    id: str,
    due: Sequence[float],
    now: float,
    catchup: Catchup,
    *,
    run: tuple[tuple[float, Cause], ...],
    cursor: float,
    missed: Span | None = None,
    coalesced: Span | None = None,
    more: bool = False,
    resumed: bool = False,
    count: int | None = None,
    first: float | None = None,
    slice_end: float | None = None,
    grace: float = GRACE,
) -> object:
    """One row: the due ticks (all of them unless ``count`` says there were more, from
    ``first``), the time and the settings, then the Decision expected."""
    total = len(due) if count is None else count
    args = (list(due), total, slice_end, due[0] if first is None else first, now)
    options = {"catchup": catchup, "grace": grace, "resumed": resumed}
    return pytest.param(args, options, Decision(run, missed, coalesced, cursor, more), id=id)


NEWEST_1000 = ticks(500 * 60, 1499 * 60)  # the kept ticks of 1500 every 60s from 0 (row 12)
SLICE_KEPT = ticks(9000 * 60, 9999 * 60)  # the kept ticks of a first slice of MAX_STEPS (row 13)

TABLE = [
    # 1-5: one tick due, on time (0.1 s late), or late but within grace, or past grace.
    case("1-on-time-none", [0], 0.1, "none", run=runs(([0], SCHEDULE)), cursor=0),
    case("1-on-time-latest", [0], 0.1, "latest", run=runs(([0], SCHEDULE)), cursor=0),
    case("1-on-time-all", [0], 0.1, "all", run=runs(([0], SCHEDULE)), cursor=0),
    case("2-within-grace-none", [0], 20, "none", run=runs(([0], SCHEDULE)), cursor=0),
    case("3-past-grace-none", [0], 40, "none", run=(), missed=(0, 0, 1, MISSED), cursor=0),
    case("4-past-grace-latest", [0], 40, "latest", run=runs(([0], CATCHUP)), cursor=0),
    case("5-past-grace-all", [0], 40, "all", run=runs(([0], CATCHUP)), cursor=0),
    # 6-10: a backlog (daemon down); older ticks past grace are missed, newer coalesced.
    case(
        "6-backlog-latest",
        ticks(0, 240),
        250,
        "latest",
        run=runs(([240], SCHEDULE)),
        missed=(0, 180, 4, MISSED),
        cursor=240,
    ),
    case(
        "7-backlog-latest-coalesced",
        ticks(0, 90, 10),
        95,
        "latest",
        run=runs(([90], SCHEDULE)),
        missed=(0, 60, 7, MISSED),
        coalesced=(70, 80, 2, COALESCED),
        cursor=90,
    ),
    # Today's behaviour, kept as the design's table has it: skipped ticks within grace are
    # coalesced whatever catchup is, though the README says "none" skips the rest as
    # missed (and SkipReason.COALESCED speaks of catchup = "latest" only). Open question.
    case(
        "8-backlog-none-newest-within-grace",
        ticks(0, 90, 10),
        95,
        "none",
        run=runs(([90], SCHEDULE)),
        missed=(0, 60, 7, MISSED),
        coalesced=(70, 80, 2, COALESCED),
        cursor=90,
    ),
    case(
        "9-backlog-none-newest-past-grace",
        ticks(0, 240),
        280,
        "none",
        run=(),
        missed=(0, 240, 5, MISSED),
        cursor=240,
    ),
    case(
        "10-backlog-all",
        ticks(0, 240),
        250,
        "all",
        run=runs(([0, 60, 120, 180], CATCHUP), ([240], SCHEDULE)),
        cursor=240,
    ),
    # 11: the first handling after a resume: every skip is paused, whatever its lateness.
    case(
        "11-resumed",
        ticks(0, 90, 10),
        95,
        "latest",
        resumed=True,
        run=runs(([90], SCHEDULE)),
        missed=(0, 60, 7, PAUSED),
        coalesced=(70, 80, 2, PAUSED),
        cursor=90,
    ),
    # 12: more than MAX_CATCHUP due, all run the newest 1000 and skip the 500 older ones.
    # Today's behaviour, fixed in a later commit: with no kept tick skipped, the missed span
    # reads (first, first, 500); it should end at NEWEST_1000[0] - 60.
    case(
        "12-all-over-max-catchup-quirk",
        NEWEST_1000,
        1499 * 60 + 10,
        "all",
        count=1500,
        first=0,
        run=runs((NEWEST_1000[:-1], CATCHUP), (NEWEST_1000[-1:], SCHEDULE)),
        missed=(0, 0, 500, MISSED),
        cursor=1499 * 60,
    ),
    # 13: a slice of a long non-every backlog: the stepped-over ticks that cannot be among
    # the newest MAX_CATCHUP are skipped up to slice_end, which is the cursor; nothing runs
    # and the caller comes back for the rest (the kept ticks are looked at again then).
    case(
        "13-slice-latest",
        SLICE_KEPT,
        20_000 * 60,
        "latest",
        count=MAX_STEPS,
        first=0,
        slice_end=8999 * 60,
        run=(),
        missed=(0, 8999 * 60, 9000, MISSED),
        cursor=8999 * 60,
        more=True,
    ),
    case(
        "13-slice-all",
        SLICE_KEPT,
        20_000 * 60,
        "all",
        count=MAX_STEPS,
        first=0,
        slice_end=8999 * 60,
        run=(),
        missed=(0, 8999 * 60, 9000, MISSED),
        cursor=8999 * 60,
        more=True,
    ),
    case(
        "13-slice-none-resumed",
        SLICE_KEPT,
        20_000 * 60,
        "none",
        resumed=True,
        count=MAX_STEPS,
        first=0,
        slice_end=8999 * 60,
        run=(),
        missed=(0, 8999 * 60, 9000, PAUSED),
        cursor=8999 * 60,
        more=True,
    ),
    # Beyond the design's table: the grace boundary is inclusive ("at most grace late").
    case("grace-exactly-none", [0], 30, "none", run=runs(([0], SCHEDULE)), cursor=0),
    case(
        "grace-exactly-coalesced",
        ticks(0, 90, 10),
        90,
        "latest",
        run=runs(([90], SCHEDULE)),
        missed=(0, 50, 6, MISSED),
        coalesced=(60, 80, 3, COALESCED),
        cursor=90,
    ),
    case(
        "past-grace-by-a-hair-none",
        [0],
        30.000001,
        "none",
        run=(),
        missed=(0, 0, 1, MISSED),
        cursor=0,
    ),
    # More than MAX_CATCHUP due and "none": every kept tick is skipped too, so the missed
    # span is right (it ends at the newest tick).
    case(
        "none-over-max-catchup",
        NEWEST_1000,
        1499 * 60 + 40,
        "none",
        count=1500,
        first=0,
        run=(),
        missed=(0, 1499 * 60, 1500, MISSED),
        cursor=1499 * 60,
    ),
    # The row 12 quirk also shows with "latest" when every kept tick that is skipped is
    # within grace (grace longer than MAX_CATCHUP ticks): today's behaviour, fixed with row
    # 12. The 500 older ticks are counted missed though they are within grace too (today's
    # "older than the kept ones: missed" shortcut). Open question.
    case(
        "latest-over-max-catchup-long-grace-quirk",
        NEWEST_1000,
        1499 * 60,
        "latest",
        count=1500,
        first=0,
        grace=10 * 86400.0,
        run=runs((NEWEST_1000[-1:], SCHEDULE)),
        missed=(0, 0, 500, MISSED),
        coalesced=(500 * 60, 1498 * 60, 999, COALESCED),
        cursor=1499 * 60,
    ),
]


class TestDecide:
    """decide(): the design's table, row by row."""

    @pytest.mark.parametrize(("args", "options", "expected"), TABLE)
    def test_table(
        self, args: tuple[Any, ...], options: dict[str, Any], expected: Decision
    ) -> None:
        assert decide(*args, **options) == expected

    def test_decision_is_frozen(self) -> None:
        got = decide([0.0], 1, None, 0.0, 0.1, catchup="latest", grace=GRACE, resumed=False)
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.cursor = 1.0  # type: ignore[misc]


class TestDueTicks:
    """due_ticks(): every due tick once, oldest first, the newest MAX_CATCHUP kept."""

    def test_every_on_time(self) -> None:
        first = utc(2026, 3, 1, 12)
        assert due_ticks(Every(60), first, first + 0.5) == ([first], 1, None)

    def test_every_now_exactly_on_a_tick(self) -> None:
        # A tick at now is due: "a run at its time", not one interval late.
        first = utc(2026, 3, 1, 12)
        assert due_ticks(Every(60), first, first + 240) == (ticks(first, first + 240), 5, None)
        assert due_ticks(Every(60), first, first + 60) == ([first, first + 60], 2, None)

    def test_every_with_offset(self) -> None:
        # offset 7.5 s: ticks at :07.5 of every minute, keeping that phase through the backlog.
        trigger = Every(60, offset=7.5)
        first = utc(2026, 3, 1, 12) + 7.5
        due, count, slice_end = due_ticks(trigger, first, utc(2026, 3, 1, 12, 4) + 7)
        assert (due, count, slice_end) == (ticks(first, first + 180), 4, None)
        # now exactly on the next tick: due as well, on the offset's phase.
        due, count, _ = due_ticks(trigger, first, first + 240)
        assert due[-1] == utc(2026, 3, 1, 12, 4) + 7.5
        assert count == 5

    def test_every_over_max_catchup_keeps_the_newest(self) -> None:
        # O(1): no slices for every, however long the backlog; the count covers all of it.
        first = utc(2026, 1, 1)
        now = first + 30 * 86400  # a month of every = "1s"
        due, count, slice_end = due_ticks(Every(1), first, now)
        assert count == 30 * 86400 + 1
        assert due == ticks(now - (MAX_CATCHUP - 1), now, 1.0)
        assert slice_end is None

    @pytest.mark.parametrize(
        ("expr", "first", "now", "expected"),
        [
            # Spring forward, 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC). Wildcard: the
            # local 02:00 and 02:30 do not exist and do not run.
            pytest.param(
                "*/30 * * * *",
                utc(2026, 3, 29, 0),  # 01:00 CET
                utc(2026, 3, 29, 2),  # 04:00 CEST
                [
                    utc(2026, 3, 29, 0),  # 01:00 CET
                    utc(2026, 3, 29, 0, 30),  # 01:30 CET
                    utc(2026, 3, 29, 1),  # 03:00 CEST
                    utc(2026, 3, 29, 1, 30),  # 03:30 CEST
                    utc(2026, 3, 29, 2),  # 04:00 CEST
                ],
                id="gap-wildcard",
            ),
            # Fixed-time, both times in the gap: they run once together, at 03:00 CEST.
            pytest.param(
                "15,45 2 * * *",
                utc(2026, 3, 28, 1, 15),  # 02:15 CET
                utc(2026, 3, 30, 1),
                [
                    utc(2026, 3, 28, 1, 15),  # 02:15 CET
                    utc(2026, 3, 28, 1, 45),  # 02:45 CET
                    utc(2026, 3, 29, 1),  # 03:00 CEST, for both 02:15 and 02:45
                    utc(2026, 3, 30, 0, 15),  # 02:15 CEST
                    utc(2026, 3, 30, 0, 45),  # 02:45 CEST
                ],
                id="gap-fixed-collapsed",
            ),
            # Fall back, 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC). Wildcard: the
            # repeated times run on each offset, two real instants each.
            pytest.param(
                "*/30 * * * *",
                utc(2026, 10, 25, 0),  # 02:00 CEST
                utc(2026, 10, 25, 2),  # 03:00 CET
                [
                    utc(2026, 10, 25, 0),  # 02:00 CEST
                    utc(2026, 10, 25, 0, 30),  # 02:30 CEST
                    utc(2026, 10, 25, 1),  # 02:00 CET
                    utc(2026, 10, 25, 1, 30),  # 02:30 CET
                    utc(2026, 10, 25, 2),  # 03:00 CET
                ],
                id="repeat-wildcard",
            ),
            # Fixed-time: a repeated time runs the first time round only.
            pytest.param(
                "30 2 * * *",
                utc(2026, 10, 24, 0, 30),  # 02:30 CEST
                utc(2026, 10, 26, 2),
                [
                    utc(2026, 10, 24, 0, 30),  # 02:30 CEST
                    utc(2026, 10, 25, 0, 30),  # 02:30 CEST, not again at 02:30 CET
                    utc(2026, 10, 26, 1, 30),  # 02:30 CET
                ],
                id="repeat-fixed-once",
            ),
            pytest.param(
                "0 0-23 * * *",
                utc(2026, 10, 24, 23),  # 01:00 CEST
                utc(2026, 10, 25, 3),  # 04:00 CET
                [
                    utc(2026, 10, 24, 23),  # 01:00 CEST
                    utc(2026, 10, 25, 0),  # 02:00 CEST, not again at 02:00 CET
                    utc(2026, 10, 25, 2),  # 03:00 CET
                    utc(2026, 10, 25, 3),  # 04:00 CET
                ],
                id="repeat-fixed-hourly",
            ),
            # The backlog ends inside the repeated hour: 02:00 CET is not due again.
            pytest.param(
                "0 0-23 * * *",
                utc(2026, 10, 25, 0),  # 02:00 CEST
                utc(2026, 10, 25, 1, 30),  # 02:30 CET
                [utc(2026, 10, 25, 0)],
                id="repeat-fixed-now-inside",
            ),
        ],
    )
    def test_cron_berlin_dst_each_tick_once(
        self, expr: str, first: float, now: float, expected: list[float]
    ) -> None:
        due, count, slice_end = due_ticks(Cron(expr, BERLIN), first, now)
        assert (due, count, slice_end) == (expected, len(expected), None)
        # With catchup = "all" each runs once, in order, as catch-up (all are hours late).
        decision = decide(due, count, slice_end, first, now, catchup="all", grace=0, resumed=False)
        assert [t for t, _ in decision.run] == expected
        assert decision.missed is None
        assert decision.coalesced is None

    def test_cron_over_max_catchup_within_max_steps(self) -> None:
        # 1500 minutes due: one pass (no slice), the newest 1000 kept, the count covers all.
        first = utc(2026, 1, 1)
        now = first + 1499 * 60
        due, count, slice_end = due_ticks(Cron("* * * * *", ZONE_UTC), first, now)
        assert (due, count, slice_end) == (ticks(first + 500 * 60, now), 1500, None)


class TestLongBacklog:
    """A backlog of more than MAX_STEPS ticks of a cron job is handled in slices."""

    FIRST = utc(2026, 1, 1)
    NOW = FIRST + 20_000 * 60  # exactly on the 20,001st minute tick

    def test_first_slice(self) -> None:
        due, count, slice_end = due_ticks(Cron("* * * * *", ZONE_UTC), self.FIRST, self.NOW)
        assert count == MAX_STEPS
        assert due == ticks(self.FIRST + 9000 * 60, self.FIRST + 9999 * 60)
        assert slice_end == self.FIRST + 8999 * 60
        decision = decide(
            due,
            count,
            slice_end,
            self.FIRST,
            self.NOW,
            catchup="latest",
            grace=GRACE,
            resumed=False,
        )
        assert decision == Decision(
            run=(),
            missed=(self.FIRST, self.FIRST + 8999 * 60, 9000, MISSED),
            coalesced=None,
            cursor=self.FIRST + 8999 * 60,
            more=True,
        )

    @pytest.mark.parametrize("catchup", ["none", "latest", "all"])
    def test_every_tick_accounted_once(self, catchup: Catchup) -> None:
        # Walked as the scheduler walks it: each slice resumes after the previous cursor.
        trigger = Cron("* * * * *", ZONE_UTC)
        first: float | None = self.FIRST
        decisions: list[Decision] = []
        while first is not None and first <= self.NOW:
            decision = decide(
                *due_ticks(trigger, first, self.NOW),
                first,
                self.NOW,
                catchup=catchup,
                grace=GRACE,
                resumed=False,
            )
            decisions.append(decision)
            if not decision.more:
                break
            first = trigger.next_after(decision.cursor)
        assert [d.more for d in decisions] == [True, True, False]
        assert [d.cursor for d in decisions] == [
            self.FIRST + 8999 * 60,
            self.FIRST + 17_999 * 60,
            self.NOW,
        ]
        # The last pass sees 2001 ticks (18,000 .. 20,000) and keeps the newest 1000.
        last = decisions[-1]
        skipped = sum(span[2] for d in decisions for span in (d.missed, d.coalesced) if span)
        assert skipped + len(last.run) == 20_001
        if catchup == "all":
            kept = ticks(self.FIRST + 19_001 * 60, self.NOW)
            assert last.run == runs((kept[:-1], CATCHUP), (kept[-1:], SCHEDULE))
            # the row 12 quirk, today's behaviour (fixed in a later commit)
            assert last.missed == (self.FIRST + 18_000 * 60, self.FIRST + 18_000 * 60, 1001, MISSED)
        else:
            # On a tick exactly: the newest runs on schedule; "none" runs it too (0 late).
            assert last.run == ((self.NOW, SCHEDULE),)
            assert last.missed == (self.FIRST + 18_000 * 60, self.NOW - 60, 2000, MISSED)
