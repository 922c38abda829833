"""Options that are tables of known keys (a TypedDict), alone or in a list: checked key by key
when the config loads, converted like top-level options (durations become timedeltas)."""

from __future__ import annotations

import datetime as dt
from typing import Literal, NotRequired, Required, TypedDict

import pytest

import taskd
from taskd.plugin.options import check_options, check_value, convert_options


class Probe(TypedDict, total=False):
    url: Required[str]
    timeout: dt.timedelta
    mode: Literal["fast", "slow"]
    tags: list[str]


class Strict(TypedDict):
    name: str
    size: NotRequired[int]


async def job(ctx: taskd.JobContext, probes: list[str | Probe], one: Strict | None = None) -> None:
    return None


JT = taskd.JobType("probe", job)


class TestCheck:
    """Each key is checked; problems name the item and the key, with a suggestion."""

    def test_valid(self) -> None:
        assert check_value({"url": "x", "timeout": "2s", "mode": "fast"}, Probe) is None
        assert check_value({"name": "a"}, Strict) is None
        assert check_options(JT, {"probes": ["a", {"url": "b"}], "one": {"name": "n"}}) == []

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (
                {"url": "x", "timout": 1},
                "unknown key 'timout' in a Probe table (did you mean 'timeout'?)",
            ),
            (
                {"url": "x", "zzz": 1},
                "unknown key 'zzz' in a Probe table (its keys: url, timeout, mode, tags)",
            ),
            ({"timeout": 1}, "missing key 'url' in a Probe table"),
            ({"url": 1}, "key 'url': expected a string, got an integer"),
            (
                {"url": "x", "mode": "medium"},
                "key 'mode': expected one of 'fast', 'slow', got 'medium'",
            ),
            (
                {"url": "x", "tags": ["a", 2]},
                "key 'tags': item 1: expected a string, got an integer",
            ),
            ("x", "expected a table (Probe), got a string"),
        ],
    )
    def test_problems(self, value: object, message: str) -> None:
        assert check_value(value, Probe) == message

    def test_in_a_union_the_table_member_explains(self) -> None:
        [(key, message, _)] = check_options(JT, {"probes": [{"url": "x", "mod": "fast"}]})
        assert key == "probes"
        assert message == "item 0: unknown key 'mod' in a Probe table (did you mean 'mode'?)"
        [(_, message, _)] = check_options(JT, {"probes": [1]})
        assert message == "item 0: expected str | Probe, got an integer"
        [(key, message, _)] = check_options(JT, {"probes": [], "one": {"size": 1}})
        assert (key, message) == ("one", "missing key 'name' in a Strict table")

    @pytest.mark.parametrize(
        ("value", "hint", "message"),
        [
            # One member takes an array: its own problem names the item and the key.
            (
                [{"name": "a", "sise": 1}],
                list[Strict] | None,
                "item 0: unknown key 'sise' in a Strict table (did you mean 'size'?)",
            ),
            (
                [{"name": 1}],
                list[Strict] | None,
                "item 0: key 'name': expected a string, got an integer",
            ),
            (["a"], list[Strict] | None, "item 0: expected a table (Strict), got a string"),
            ([{"name": "a", "sise": 1}], int | list[Strict], "item 0: unknown key 'sise'"),
            # One member takes a table: a dict[str, X] member explains too.
            ({"a": {"nme": "x"}}, dict[str, Strict] | None, "key 'a': unknown key 'nme'"),
            ({"a": "x"}, dict[str, int] | str, "key 'a': expected an integer, got a string"),
            # Two members take an array: which one was meant is unknown, so the union is named.
            (
                [1.5],
                list[str] | list[bool] | None,
                "expected list[str] | list[bool] | None, got an array",
            ),
            # The value's kind fits no member: the union is named.
            (5, list[Strict] | None, "expected list[Strict] | None, got an integer"),
        ],
    )
    def test_in_a_union_the_one_member_of_its_kind_explains(
        self, value: object, hint: object, message: str
    ) -> None:
        problem = check_value(value, hint)
        assert problem is not None and problem.startswith(message), problem

    def test_unresolvable_annotation_is_reported_not_raised(self) -> None:
        class Bad(TypedDict):
            x: Nope  # type: ignore[name-defined]  # noqa: F821

        message = check_value({"x": 1}, Bad)
        assert message is not None and "cannot be resolved" in message


def test_convert_reaches_into_tables() -> None:
    kwargs = convert_options(JT, {"probes": ["a", {"url": "b", "timeout": "1m30s"}]})
    assert kwargs["probes"] == ["a", {"url": "b", "timeout": dt.timedelta(seconds=90)}]
