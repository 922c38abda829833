"""taskd.run.limits: results measured as the UTF-8 bytes of their stored JSON text, without
building text past the limit; error text rendered within bounds."""

from __future__ import annotations

import json
import random
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import pytest

from taskd.run.encoding import NO_RESULT, TooLarge, encode, size_text, too_large
from taskd.run.limits import cut, describe, recall, remember


def stored_bytes(value: Any) -> int:
    """What the daemon stores, measured the slow, obvious way."""
    if value is None:
        return 0  # no result: nothing stored
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = json.dumps(repr(value), ensure_ascii=False)
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return len(json.dumps(value))


@dataclass
class Point:
    x: int
    rows: list[Any] = field(default_factory=list)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(14 if depth < 4 else 8)
    leaves: list[Any] = [
        None,
        True,
        False,
        rng.randrange(-(10**12), 10**12),
        rng.random() * 10 ** rng.randrange(-300, 300),
        "".join(rng.choice('aé\x00"\\😀\n') for _ in range(rng.randrange(20))),
        b"\x00bytes",
        float("nan"),
    ]
    if pick < 8:
        return leaves[pick]
    items = [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if pick == 8:
        return items
    if pick == 9:
        return tuple(items)
    if pick == 10:
        return {str(i) if i % 2 else i: v for i, v in enumerate(items)}
    if pick == 11:
        return [items] * rng.randrange(1, 5)  # shared references
    if pick == 12:
        return {frozenset({1, 2}), 3} if rng.random() < 0.5 else {None: items, False: 1.5}
    return Point(rng.randrange(100), items)


class TestEncode:
    """encode() agrees with json.dumps(ensure_ascii=False) in UTF-8 bytes, to the byte."""

    @pytest.mark.parametrize(
        "value",
        [
            0,
            -5,
            2**80,
            1.5,
            float("inf"),
            True,
            "",
            "a" * 100,
            "é😀\x00\n",
            [1, "x", None],
            (1, 2),
            {"a": [1, {"b": "c"}], 1: 2.5, None: False},
            {1, 2},
            b"\x00\xff",
            Point(1, [1, 2]),
            {"x": "\ud800"},  # a lone surrogate: stored \u-escaped
            [[["x" * 10] * 5] * 5] * 5,
        ],
    )
    def test_the_size_is_what_would_be_stored(self, value: Any) -> None:
        enc = encode(value, 1 << 20)
        assert enc.size == stored_bytes(value) == len(enc.text.encode())  # type: ignore[union-attr]

    def test_none_is_no_result(self) -> None:
        assert encode(None, 10) is NO_RESULT

    def test_a_cycle_is_stored_as_its_repr(self) -> None:
        cycle: list[Any] = [1]
        cycle.append(cycle)
        enc = encode(cycle, 1000)
        assert enc.stored == "[1, [...]]" and not enc.serialisable

    @pytest.mark.parametrize("limit", [2, 10, 100, 1000, 5000])
    def test_random_values_pass_or_fail_exactly_at_the_limit(self, limit: int) -> None:
        rng = random.Random(limit)
        for _ in range(400):
            value = random_value(rng)
            exact = stored_bytes(value)
            if exact <= limit:
                assert encode(value, limit).size == exact, value
            else:
                with pytest.raises(TooLarge) as over:
                    encode(value, limit)
                assert over.value.size > limit and (
                    not over.value.exact or over.value.size == exact
                )

    @pytest.mark.parametrize("kind", ["str", "é", "list", "tuple", "dict", "set", "bytes"])
    def test_shared_references_fail_without_building_the_text(self, kind: str) -> None:
        s = {"str": "x", "é": "é", "bytes": b"x"}.get(kind, "x") * 1000
        row: Any = [s] * 1000
        value: Any = {
            "tuple": tuple([tuple(row)] * 1000),
            "dict": [dict.fromkeys(range(1000), s)] * 1000,
            "set": [{s}] * 10**6,
        }.get(kind, [row] * 1000)
        tracemalloc.start()
        try:
            with pytest.raises(TooLarge):
                encode(value, 1 << 20)  # about 1 GB of text
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, peak

    def test_a_dataclass_with_shared_fields_fails_by_its_fields(self) -> None:
        row = ["x" * 1000] * 1000
        with pytest.raises(TooLarge):
            encode(Point(1, [row] * 1000), 1 << 20)

    def test_the_boundary_in_bytes_not_characters(self) -> None:
        assert encode("é" * 499, 1000).size == 1000
        with pytest.raises(TooLarge):
            encode("é" * 500, 1000)
        assert encode("😀" * 249, 1000).size == 998  # 4 bytes each, not a 12-char escape


class TestDescribe:
    """describe() is str() for ordinary exceptions, abridged for big ones."""

    @pytest.mark.parametrize(
        "exc",
        [
            ValueError("no"),
            KeyError("k"),
            OSError(2, "No such file or directory", "/x"),
            RuntimeError(),
            ValueError([1, 2, 3]),
            ValueError("a", 1),
        ],
    )
    def test_ordinary_exceptions_read_as_str(self, exc: BaseException) -> None:
        text, name = str(exc), type(exc).__qualname__
        assert describe(exc) == (f"{name}: {text}" if text else name)

    def test_big_arguments_are_abridged_without_str(self) -> None:
        row = ["x" * 1000] * 1000

        class Loud(Exception):
            def __str__(self) -> str:
                raise AssertionError("str() must not be called")

        for exc in (ValueError([row] * 1000), Loud([row] * 1000)):
            tracemalloc.start()
            try:
                text = describe(exc)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert text.startswith(f"{type(exc).__qualname__}: [['xxx")
            assert len(text) < 4200 and peak < 4 << 20

    def test_a_long_message_is_cut_once(self) -> None:
        text = describe(ValueError("m" * 10_000))
        assert text.endswith(f"... [{10_000 + 12 - 4096} more characters cut]")

    def test_remembered_text_wins(self) -> None:
        exc = ValueError("x")
        remember(exc, "ValueError: made elsewhere")
        assert recall(exc) == "ValueError: made elsewhere"
        assert recall(ValueError("y")) is None


class TestWording:
    @pytest.mark.parametrize(
        ("n", "text"),
        [
            (50, "50 bytes"),
            (1000, "1000 bytes (1 KB)"),
            (1024, "1024 bytes (1 KiB)"),
            (1 << 20, "1048576 bytes (1 MiB)"),
            (3 << 30, "3221225472 bytes (3 GiB)"),
            (1500, "1500 bytes"),
        ],
    )
    def test_size_text_never_rounds(self, n: int, text: str) -> None:
        assert size_text(n) == text

    def test_too_large_names_the_limit_and_the_fix(self) -> None:
        msg = too_large("list", 1002, True, 1000)
        assert "is 1002 bytes as JSON" in msg and "max_result_size=1000 bytes (1 KB)" in msg
        assert "more than 1000 bytes" in too_large("list", 1001, False, 1000)

    def test_cut(self) -> None:
        assert cut("abc", 5) == "abc"
        assert cut("abcdef", 3) == "abc... [3 more characters cut]"
