"""SharedState.set_result: the run that took its ticket last wins, in any order of writes."""

from __future__ import annotations

from typing import Any

from taskd.state.shared import SharedState


class TestTickets:
    """Tickets taken at run end decide; the order writes arrive in does not."""

    def test_older_write_after_newer_is_dropped(self) -> None:
        s = SharedState()
        seen: list[tuple[str, Any]] = []
        s.add_listener(lambda data, keys: seen.extend((k, data[k]) for k in keys))
        a, b = s.result_ticket("j"), s.result_ticket("j")
        assert s.set_result("j", "B", b)
        assert not s.set_result("j", "A", a)
        assert s.get("j") == "B"
        assert seen == [("j", "B")]

    def test_in_order_writes_apply(self) -> None:
        s = SharedState()
        a = s.result_ticket("j")
        assert s.set_result("j", "A", a)
        b = s.result_ticket("j")
        assert s.set_result("j", "B", b)
        assert s.get("j") == "B"

    def test_keys_are_independent(self) -> None:
        s = SharedState()
        a, b = s.result_ticket("x"), s.result_ticket("y")
        assert s.set_result("y", 2, b) and s.set_result("x", 1, a)
        assert s.snapshot() == {"x": 1, "y": 2}
