"""check_options: a job's options table against its function's parameters and annotations."""

from __future__ import annotations

import datetime as dt
import enum
import functools
import os
import pathlib
from typing import TYPE_CHECKING, Any, Literal, Optional, TypedDict

import pytest

from taskd.plugin.jobtype import JobType
from taskd.plugin.options import (
    check_options,
    check_value,
    convert_options,
    describe_options,
    signature_problem,
)

# Job functions live at module level: annotations are strings here (``from __future__ import
# annotations``), as in most plugin files, and must still be resolved.


def everything(
    name: str,
    count: int = 1,
    ratio: float = 0.5,
    flag: bool = False,
    tags: list[str] = [],  # noqa: B006 - never called
    limits: dict[str, int] = {},  # noqa: B006
    mode: Literal["fast", "slow"] = "fast",
    level: Literal[1, 2, 3] = 1,
    maybe: int | None = None,
    old_style: Optional[str] = None,  # noqa: UP045 - Optional on purpose
    where: pathlib.Path = pathlib.Path("/"),
    when: dt.datetime | None = None,
    day: dt.date | None = None,
    anything: Any = None,
    untyped=None,  # type: ignore[no-untyped-def]
) -> None: ...


def blocking_job(path: str, *, depth: int = 2) -> None: ...


async def io_job(ctx: Any, url: str, tries: int = 3) -> None: ...


def takes_kwargs(first: int = 0, **rest: Any) -> None: ...


def positional_only(a: int, /, b: int = 1) -> None: ...


def positional_only_defaulted(a: int = 1, /, b: int = 2) -> None: ...


async def io_positional_ctx(ctx: Any, /, n: int = 1) -> None: ...


async def io_no_params() -> None: ...


async def io_keyword_ctx(*, ctx: Any) -> None: ...


def star_args(*items: int, size: int = 1) -> None: ...


def future_unresolvable(x: NoSuchName = 1) -> None: ...  # type: ignore[name-defined]  # noqa: F821


if TYPE_CHECKING:
    from taskd import JobContext


async def ctx_type_checking_only(ctx: JobContext, count: int = 1) -> None: ...


class Speed(enum.Enum):
    SLOW = "slow"
    FAST = "fast"


def with_enum(speed: Speed = Speed.SLOW) -> None: ...


def with_timedelta(age: dt.timedelta) -> None: ...


def with_tuple_and_set(
    pair: tuple[int, str], tags: set[str], nums: tuple[int, ...] = ()
) -> None: ...


def with_bytes(data: bytes) -> None: ...


EVERYTHING = JobType("everything", everything, kind="blocking")


def problems(jt: JobType, options: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    found = check_options(jt, options)
    by_key = {key: (message, hint) for key, message, hint in found}
    assert len(by_key) == len(found), f"one problem per option, got {found}"
    return by_key


class TestUnknownAndMissing:
    """Unknown options get a suggestion; required parameters must be given."""

    def test_valid_options_have_no_problems(self) -> None:
        assert check_options(EVERYTHING, {"name": "x"}) == []

    def test_unknown_option_with_suggestion(self) -> None:
        found = problems(EVERYTHING, {"name": "x", "cuont": 3})
        message, hint = found["cuont"]
        assert message == "unknown option 'cuont' for job type 'everything'"
        assert hint == "did you mean 'count'?"

    def test_unknown_option_lists_the_known_ones(self) -> None:
        jt = JobType("b", blocking_job, kind="blocking")
        found = problems(jt, {"path": "/", "zzzzzz": 1})
        _, hint = found["zzzzzz"]
        assert hint == "its options: path, depth"

    def test_unknown_option_for_a_job_without_options(self) -> None:
        async def bare(ctx: Any) -> None: ...

        found = problems(JobType("bare", bare), {"x": 1})
        assert found["x"][1] == "its options: none"

    def test_missing_required(self) -> None:
        found = problems(EVERYTHING, {})
        message, _ = found["name"]
        assert message == "missing required option 'name' (str) for job type 'everything'"

    def test_missing_required_untyped(self) -> None:
        def f(thing) -> None: ...  # type: ignore[no-untyped-def]

        found = problems(JobType("f", f, kind="blocking"), {})
        assert "missing required option 'thing' (value)" in found["thing"][0]

    def test_keyword_only_parameters_are_options(self) -> None:
        jt = JobType("b", blocking_job, kind="blocking")
        assert check_options(jt, {"path": "/", "depth": 3}) == []
        assert "depth" in problems(jt, {"path": "/", "depth": "deep"})

    def test_every_problem_is_reported(self) -> None:
        found = problems(EVERYTHING, {"count": "1", "flag": 1, "nope": 2})
        assert set(found) == {"count", "flag", "nope", "name"}

    def test_kwargs_accepts_anything(self) -> None:
        jt = JobType("k", takes_kwargs, kind="blocking")
        assert check_options(jt, {"first": 1, "other": "x", "more": [1, {"a": 2}]}) == []
        # declared parameters are still checked
        assert "first" in problems(jt, {"first": "x"})

    def test_star_args_are_not_options(self) -> None:
        jt = JobType("s", star_args, kind="blocking")
        assert "items" in problems(jt, {"items": [1]})
        assert check_options(jt, {"size": 2}) == []


class TestIoJobs:
    """An io job's first parameter is the run context, never an option."""

    IO = JobType("io", io_job)

    def test_ctx_is_skipped(self) -> None:
        assert check_options(self.IO, {"url": "https://example.org"}) == []

    def test_ctx_is_not_an_option(self) -> None:
        found = problems(self.IO, {"url": "u", "ctx": 1})
        assert found["ctx"][0] == "unknown option 'ctx' for job type 'io'"

    def test_ctx_is_not_required(self) -> None:
        assert set(problems(self.IO, {})) == {"url"}

    def test_options_after_ctx_are_typed(self) -> None:
        assert problems(self.IO, {"url": "u", "tries": "3"})["tries"][0] == (
            "expected an integer, got a string"
        )

    def test_describe_skips_ctx(self) -> None:
        assert describe_options(self.IO) == [
            {"name": "url", "type": "str", "required": True, "default": None},
            {"name": "tries", "type": "int", "required": False, "default": "3"},
        ]


TYPE_CASES: list[tuple[str, Any, str | None]] = [
    # str
    ("name", "x", None),
    ("name", 5, "expected a string, got an integer"),
    ("name", ["x"], "expected a string, got an array"),
    ("name", True, "expected a string, got a boolean"),
    # int: bool is not an int, float is not an int
    ("count", 3, None),
    ("count", -3, None),
    ("count", True, "expected an integer, got a boolean"),
    ("count", 1.5, "expected an integer, got a float"),
    ("count", "3", "expected an integer, got a string"),
    # float: int is accepted, bool is not
    ("ratio", 0.25, None),
    ("ratio", 2, None),
    ("ratio", False, "expected a number, got a boolean"),
    ("ratio", "0.5", "expected a number, got a string"),
    # bool
    ("flag", True, None),
    ("flag", False, None),
    ("flag", 1, "expected true or false, got an integer"),
    ("flag", "true", "expected true or false, got a string"),
    # list[str]
    ("tags", [], None),
    ("tags", ["a", "b"], None),
    ("tags", "a", "expected an array (list[str]), got a string"),
    ("tags", ["a", 2], "item 1: expected a string, got an integer"),
    ("tags", [["a"]], "item 0: expected a string, got an array"),
    # dict[str, int]
    ("limits", {}, None),
    ("limits", {"a": 1, "b": 2}, None),
    ("limits", {"a": 1, "b": "2"}, "key 'b': expected an integer, got a string"),
    ("limits", {"a": True}, "key 'a': expected an integer, got a boolean"),
    ("limits", [1], "expected a table (dict[str, int]), got an array"),
    # Literal
    ("mode", "fast", None),
    ("mode", "slow", None),
    ("mode", "medium", "expected one of 'fast', 'slow', got 'medium'"),
    ("mode", 1, "expected one of 'fast', 'slow', got 1"),
    ("level", 2, None),
    ("level", 4, "expected one of 1, 2, 3, got 4"),
    ("level", "1", "expected one of 1, 2, 3, got '1'"),
    # X | None and Optional[X]
    ("maybe", 3, None),
    ("maybe", "3", "expected int | None, got a string"),
    ("maybe", True, "expected int | None, got a boolean"),
    ("old_style", "s", None),
    ("old_style", 1, "expected Optional[str], got an integer"),
    # Path takes a string
    ("where", "/var/tmp", None),
    ("where", 5, "expected a string, got an integer"),
    # TOML date-times
    ("when", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), None),
    ("when", dt.datetime(2026, 1, 1), None),
    ("when", "2026-01-01T00:00:00Z", "expected datetime.datetime | None, got a string"),
    ("when", dt.date(2026, 1, 1), "expected datetime.datetime | None, got date"),
    ("day", dt.date(2026, 1, 1), None),
    ("day", 20260101, "expected datetime.date | None, got an integer"),
    # Any and no annotation accept anything
    ("anything", {"deep": [1, "x", {"y": None}]}, None),
    ("untyped", [1, "two"], None),
]


class TestTypes:
    """Each option value is checked against its annotation, including generics and unions."""

    @pytest.mark.parametrize(("key", "value", "expected"), TYPE_CASES)
    def test_type(self, key: str, value: Any, expected: str | None) -> None:
        found = problems(EVERYTHING, {"name": "n", key: value})
        if expected is None:
            assert found == {}
        else:
            assert found == {key: (expected, None)}

    @pytest.mark.parametrize("value", [True, False])
    def test_bool_is_not_an_int_literal(self, value: bool) -> None:
        # true == 1 in Python, but `level = true` in TOML is not the number 1.
        assert "level" in problems(EVERYTHING, {"name": "n", "level": value})

    def test_bool_literal(self) -> None:
        assert check_value(True, Literal[True]) is None
        assert check_value(False, Literal[True]) is not None

    @pytest.mark.parametrize(
        ("value", "hint", "ok"),
        [
            ([1, "a"], tuple[int, str], True),
            ("x", tuple[int, ...], False),
            (["a"], set[str], True),
            ([1], frozenset[str], False),
            ([1], list, True),
            (1, list, False),
            ({"a": 1}, dict, True),
            ([], dict, False),
            ({"a": [1]}, dict[str, list[int]], True),
            ({"a": ["1"]}, dict[str, list[int]], False),
            ([[1, 2], [3]], list[list[int]], True),
            ([[1, "2"]], list[list[int]], False),
            ("x", str | int, True),
            (1, str | int, True),
            (1.5, str | int, False),
            (None, int | None, True),
            ("/x", pathlib.PurePath, True),
            (dt.time(9, 0), dt.time, True),
            ("09:00", dt.time, False),
        ],
    )
    def test_check_value(self, value: Any, hint: Any, ok: bool) -> None:
        assert (check_value(value, hint) is None) is ok

    def test_nested_item_error_names_the_path(self) -> None:
        assert check_value({"a": ["1"]}, dict[str, list[int]]) == (
            "key 'a': item 0: expected an integer, got a string"
        )

    def test_unresolvable_annotation_is_a_clear_problem(self) -> None:
        # Once, one unresolvable name switched off every option's checks; now it is named.
        jt = JobType("u", future_unresolvable, kind="blocking")
        problem = signature_problem(jt)
        assert problem is not None and "'NoSuchName'" in problem and "option 'x'" in problem
        assert "TYPE_CHECKING" in problem
        ((key, message, _),) = check_options(jt, {"x": 5})
        assert key == "" and "cannot be resolved" in message

    def test_context_only_under_type_checking_keeps_option_checks(self) -> None:
        # The common pattern: the ctx annotation names a TYPE_CHECKING-only import; the
        # options are still resolved and checked.
        jt = JobType("c", ctx_type_checking_only)
        assert signature_problem(jt) is None
        assert problems(jt, {"count": "three"}) == {
            "count": ("expected an integer, got a string", None)
        }
        assert check_options(jt, {"count": 3}) == []


class TestMoreTypes:
    """Enum, timedelta, tuple and set options are checked and converted."""

    def test_enum(self) -> None:
        jt = JobType("e", with_enum, kind="blocking")
        assert check_options(jt, {"speed": "fast"}) == []
        assert "expected one of 'slow', 'fast'" in problems(jt, {"speed": "warp"})["speed"][0]
        assert convert_options(jt, {"speed": "fast"}) == {"speed": Speed.FAST}

    def test_timedelta_takes_durations(self) -> None:
        jt = JobType("t", with_timedelta, kind="blocking")
        assert check_options(jt, {"age": "1h30m"}) == []
        assert "cannot read 'soon'" in problems(jt, {"age": "soon"})["age"][0]
        assert convert_options(jt, {"age": "1h30m"}) == {"age": dt.timedelta(minutes=90)}

    def test_tuple_and_set(self) -> None:
        jt = JobType("t", with_tuple_and_set, kind="blocking")
        assert check_options(jt, {"pair": [1, "a"], "tags": ["x", "y"], "nums": [1, 2]}) == []
        assert "expected an array of 2 items" in problems(jt, {"pair": [1]})["pair"][0]
        assert "item 1: expected a string" in problems(jt, {"pair": [1, 2]})["pair"][0]
        assert "item 0: expected an integer" in problems(jt, {"nums": ["x"]})["nums"][0]
        converted = convert_options(jt, {"pair": [1, "a"], "tags": ["x", "x"], "nums": [3]})
        assert converted == {"pair": (1, "a"), "tags": {"x"}, "nums": (3,)}

    def test_bytes_is_never_a_toml_value(self) -> None:
        jt = JobType("b", with_bytes, kind="blocking")
        assert problems(jt, {"data": "abc"}) == {"data": ("expected bytes, got a string", None)}


class TestSignatureProblem:
    """A function that cannot take options by keyword makes the job type invalid."""

    @pytest.mark.parametrize(
        ("func", "kind", "fragment"),
        [
            (positional_only, "blocking", "parameter 'a' is positional-only"),
            (io_no_params, "io", "takes the run context as its first parameter"),
            (io_keyword_ctx, "io", "takes the run context as its first (positional) parameter"),
        ],
    )
    def test_invalid(self, func: Any, kind: Any, fragment: str) -> None:
        problem = signature_problem(JobType("t", func, kind=kind))
        assert problem is not None
        assert fragment in problem

    @pytest.mark.parametrize(
        ("func", "kind"),
        [
            (everything, "blocking"),
            (blocking_job, "blocking"),
            (io_job, "io"),
            (io_positional_ctx, "io"),
            (takes_kwargs, "cpu"),
            (positional_only_defaulted, "blocking"),
            (star_args, "blocking"),
        ],
    )
    def test_valid(self, func: Any, kind: Any) -> None:
        assert signature_problem(JobType("t", func, kind=kind)) is None


class TestDescribeOptions:
    """describe_options lists name, type, required and default for ``taskd plugins``."""

    def test_describe(self) -> None:
        described = {o["name"]: o for o in describe_options(EVERYTHING)}
        assert described["name"] == {
            "name": "name",
            "type": "str",
            "required": True,
            "default": None,
        }
        assert described["tags"]["type"] == "list[str]"
        assert described["limits"]["type"] == "dict[str, int]"
        assert described["mode"]["type"] == "Literal['fast', 'slow']"
        assert described["maybe"]["type"] == "int | None"
        assert described["count"]["default"] == "1"
        assert described["untyped"]["type"] is None
        assert list(described)[:3] == ["name", "count", "ratio"]

    def test_kwargs_not_listed(self) -> None:
        assert [
            o["name"] for o in describe_options(JobType("k", takes_kwargs, kind="blocking"))
        ] == ["first"]


class _Shape(TypedDict):
    x: int


def with_typeddict(shape: _Shape) -> None: ...


def with_pathlike(where: os.PathLike[str]) -> None: ...


def _base(count: int, label: str = "") -> None: ...


class TestAnnotationEdges:
    """Annotations a second review found mishandled."""

    def test_typeddict_does_not_crash(self) -> None:
        jt = JobType("t", with_typeddict, kind="blocking")
        assert check_options(jt, {"shape": {"x": 1}}) == []

    def test_pathlike_takes_a_string_and_gets_a_path(self) -> None:
        jt = JobType("p", with_pathlike, kind="blocking")
        assert check_options(jt, {"where": "/srv"}) == []
        assert convert_options(jt, {"where": "/srv"}) == {"where": pathlib.Path("/srv")}

    def test_partial_resolves_in_its_function_module(self) -> None:
        jt = JobType("q", functools.partial(_base, label="x"), kind="blocking")
        assert signature_problem(jt) is None
        assert "expected an integer" in problems(jt, {"count": "no"})["count"][0]
