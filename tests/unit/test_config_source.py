"""taskd.config.source: the config file read and parsed within bounds, in a process of its own.
The limits are shrunk here so that each bound is met in a fraction of a second."""

from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path

import pytest

from taskd.config import source
from taskd.config.lines import KeyLines, key_lines
from taskd.config.source import MAX_DEPTH, read_toml
from taskd.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    (issue,) = info.value.issues
    assert issue.file == str(path)
    return str(issue)


@pytest.fixture
def toml(tmp_path: Path):  # type: ignore[no-untyped-def]
    def create(text: str) -> Path:
        path = tmp_path / "taskd.toml"
        path.write_text(text)
        return path

    return create


class TestDocument:
    """What comes back from the parser process is the document tomllib reads, lines included."""

    def test_every_toml_type_round_trips(self, toml) -> None:  # type: ignore[no-untyped-def]
        text = (
            's = "x"\ni = 1\nf = 1.5\ninf = inf\nb = true\n'
            "dt = 1979-05-27T07:32:00-08:00\nutc = 1979-05-27T07:32:00Z\n"
            "local = 1979-05-27T07:32:00\nd = 1979-05-27\ntm = 07:32:00.5\n"
            "a = [1, [2, {x = 3}]]\n[t]\nk = 'v'\n[[arr]]\nn = 1\n"
        )
        import tomllib

        doc, lines = read_toml(toml(text))
        assert doc == tomllib.loads(text)
        assert doc["dt"].utcoffset() == datetime.timedelta(hours=-8)
        assert lines["t.k"] == 13 and lines["s"] == 1

    def test_nesting_up_to_the_limit_is_read(self, toml) -> None:  # type: ignore[no-untyped-def]
        # "a" (the outer array) is 1 deep; each array inside adds one: the innermost (empty)
        # array is MAX_DEPTH deep.
        n = MAX_DEPTH
        doc, _ = read_toml(toml("a = " + "[" * n + "]" * n + "\n"))
        assert "a" in doc

    @pytest.mark.parametrize(
        ("text", "where"),
        [
            (
                "a = " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n",
                "a" + "[0]" * MAX_DEPTH,
            ),
            (".".join(["k"] * (MAX_DEPTH + 1)) + " = 1\n", ".".join(["k"] * (MAX_DEPTH + 1))),
            ("[" + ".".join(["t"] * MAX_DEPTH) + "]\nx = 1\n", ".".join(["t"] * MAX_DEPTH) + ".x"),
        ],
        ids=["arrays", "dotted-key", "table-header"],
    )
    def test_one_level_more_is_refused(self, toml, text: str, where: str) -> None:  # type: ignore[no-untyped-def]
        message = refusal(toml(text))
        assert f" {where}: nested {MAX_DEPTH + 1} levels deep" in message
        assert f"the limit is {MAX_DEPTH}" in message

    def test_the_depth_error_names_the_line(self, toml) -> None:  # type: ignore[no-untyped-def]
        path = toml('[jobs.x]\ntype = "t"\n[jobs.x.options]\ndeep.' + ".".join("a" * 40) + " = 1\n")
        assert refusal(path).startswith(f"{path}:4: jobs.x.options.deep.a.a")


class TestBounds:
    """Each bound of the parser process, met: a ConfigError naming it, nothing left running."""

    def test_cpu_limit(self, toml, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(source, "PARSE_CPU_SECONDS", 1)
        message = refusal(toml(".".join(["a"] * 500_000) + " = 1\n"))
        assert "more than 1 s of CPU time" in message and "dotted key" in message

    def test_memory_limit(self, toml, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(source, "PARSE_MEMORY", 96 * 1024 * 1024)
        message = refusal(toml(".".join(["a"] * 19_500) + " = 1\n"))
        assert "more than 96 MiB of memory" in message

    def test_wall_clock_limit(self, toml, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(source, "PARSE_TIMEOUT", 0.5)
        message = refusal(toml(".".join(["a"] * 500_000) + " = 1\n"))
        assert "did not finish within 0.5 s" in message

    def test_answer_size_limit(self, toml, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(source, "MAX_ANSWER_BYTES", 10_000)
        message = refusal(toml("".join(f"k{i} = {i}\n" for i in range(5000))))
        assert "the parsed config is over 10000 bytes" in message

    def test_file_over_the_size_limit(self, toml) -> None:  # type: ignore[no-untyped-def]
        message = refusal(toml("#" * source.MAX_CONFIG_BYTES + "\n"))
        assert f"the limit is {source.MAX_CONFIG_BYTES} bytes" in message

    def test_fifo_is_refused_without_waiting(self, tmp_path: Path) -> None:
        os.mkfifo(tmp_path / "taskd.toml")
        assert "not a regular file" in refusal(tmp_path / "taskd.toml")

    def test_parser_that_cannot_start(self, toml, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(source.sys, "executable", "/nonexistent/python")
        assert "cannot start the config parser (/nonexistent/python)" in refusal(toml("a = 1\n"))


class TestUnpickler:
    """The answer is unpickled with only the types a TOML document holds."""

    def test_dates_pass(self) -> None:
        value = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
        data = pickle.dumps({"a": [value, datetime.date(2026, 1, 1), datetime.time(1)]})
        assert source._Unpickler(__import__("io").BytesIO(data)).load()["a"][0] == value

    def test_anything_else_is_refused(self) -> None:
        data = pickle.dumps(Path("/"))
        with pytest.raises(pickle.UnpicklingError, match="not part of a TOML document"):
            source._Unpickler(__import__("io").BytesIO(data)).load()


class TestKeyLines:
    """The key -> line scan records at most its depth of parts and never backtracks badly."""

    def test_long_dotted_key_records_only_its_first_parts(self) -> None:
        lines = key_lines(".".join(["a"] * 20_000) + " = 1\n", depth=8)
        assert len(lines) == 8 and max(len(k.split(".")) for k in lines) == 8

    def test_header_with_spaces_inside(self) -> None:
        assert key_lines("[ jobs . a ]\nx = 1\n") == {"jobs.a": 1, "jobs.a.x": 2}

    def test_a_valid_config_is_not_scanned_until_a_line_is_asked_for(self, toml) -> None:  # type: ignore[no-untyped-def]
        # The scan was a fifth of the parse of 10,000 jobs; a valid config needs no line.
        path = toml('\ufeff[jobs.a]\ntype = "t"\n\n[jobs.b]\nevery = "1h"\n')
        doc, lines = read_toml(path)
        assert doc == {"jobs": {"a": {"type": "t"}, "b": {"every": "1h"}}}
        assert isinstance(lines, KeyLines)
        assert lines._lines is None  # not scanned
        assert lines.get("jobs.b.every") == 5
        assert "jobs.a.type" in lines and lines["jobs.a"] == 1
        assert dict(lines) == key_lines(path.read_text(encoding="utf-8-sig"))
        assert len(lines) == 4

    def test_validating_a_valid_config_scans_no_line(self, toml) -> None:  # type: ignore[no-untyped-def]
        # Nothing in a valid config's validation asks for a line (a JobConfig field once
        # did, for every job, and the start then paid for the whole scan).
        from taskd.config import load_config

        config = load_config(
            toml('[jobs.a]\ntype = "t"\nevery = "1h"\n[jobs.b]\ntype = "t"\non = "startup"\n')
        )
        assert isinstance(config.lines, KeyLines) and config.lines._lines is None
        assert config.line_of("jobs.b.on") == 6
