"""``taskd exec JOB`` as a plugin author uses it: it runs the one job even when other jobs in
the file are broken (bad table, unknown type, bad options, broken plugin), and ``-o
key=value`` overrides the job's options, each value read as a TOML value and checked like
the config (real CLI processes, real files)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.helpers import run_cli

PLUGIN = '''
from pathlib import Path

import taskd


async def echo(
    ctx: taskd.JobContext,
    word: str = "hi",
    times: int = 1,
    urls: list[str] = [],
    headers: dict[str, str] = {},
    ratio: float = 0.5,
    loud: bool = False,
) -> dict:
    """Return the options as received."""
    return {
        "word": word, "times": times, "urls": urls, "headers": headers,
        "ratio": ratio, "loud": loud, "job": ctx.job,
    }


def where(path: Path) -> str:
    """Return the path's type and text."""
    return f"{type(path).__name__}:{path}"


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("echo", echo),
        taskd.JobType("where", where, kind="blocking"),
    ]
'''

CONFIG = """
[daemon]
plugin_dirs = ["plugins.d"]
state_dir = "state"
runtime_dir = "run"
entry_points = false
process_workers = 1

[jobs.good]
type = "echo"
every = "1h"
[jobs.good.options]
word = "from-config"
headers = { Accept = "text/plain" }

[jobs.place]
type = "where"
every = "1h"
[jobs.place.options]
path = "/tmp"
"""

OTHERS_BROKEN = """
[jobs.bad-table]
type = "echo"
every = "5x"
overlap = "skp"

[jobs.bad-type]
type = "no_such_type"
every = "1h"

[jobs.bad-options]
type = "echo"
every = "1h"
[jobs.bad-options.options]
times = "three"
nope = 1

[jobs.bad-plugin]
type = "sql_query"
every = "1h"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    plugins = tmp_path / "plugins.d"
    plugins.mkdir()
    (plugins / "echo.py").write_text(textwrap.dedent(PLUGIN))
    config = tmp_path / "taskd.toml"
    config.write_text(textwrap.dedent(CONFIG).lstrip())
    return config


def _exec(config: Path, *args: str) -> tuple[int, dict | None, str]:
    result = run_cli("exec", *args, "--json", "-c", str(config))
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = None
    # Lines that are not JSON log lines (which may carry a broken plugin's traceback).
    said = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert "Traceback" not in "\n".join(said), result.stderr
    return result.returncode, data, result.stderr


class TestOtherJobsBroken:
    """A broken job elsewhere in the file does not stop exec of a good one."""

    def test_runs_despite_every_kind_of_broken_neighbour(self, project: Path) -> None:
        project.write_text(project.read_text() + textwrap.dedent(OTHERS_BROKEN))
        (project.parent / "plugins.d" / "sqlthing.py").write_text("import no_such_driver_x\n")
        code, data, err = _exec(project, "good")
        assert code == 0, err
        assert data is not None and data["result"]["word"] == "from-config"
        # The neighbours' problems are still shown, as warnings.
        warning = err[err.index("taskd: warning: 4 other jobs") :]
        for neighbour in ("bad-table", "bad-type", "bad-options", "bad-plugin"):
            assert f"jobs.{neighbour}" in warning, warning

    def test_the_broken_job_itself_still_fails(self, project: Path) -> None:
        project.write_text(project.read_text() + textwrap.dedent(OTHERS_BROKEN))
        for job, fragment in [
            ("bad-table", "cannot read '5x'"),
            ("bad-type", "unknown job type 'no_such_type'"),
            ("bad-options", "unknown option 'nope'"),
        ]:
            code, data, err = _exec(project, job)
            assert code == 1, (job, err)
            assert data is None
            assert fragment in err, (job, err)

    def test_a_config_error_outside_jobs_still_fails(self, project: Path) -> None:
        project.write_text(project.read_text().replace("entry_points", "entry_pints"))
        code, _, err = _exec(project, "good")
        assert code == 1
        assert "entry_pints" in err

    def test_unknown_job_lists_broken_ones_too(self, project: Path) -> None:
        project.write_text(project.read_text() + textwrap.dedent(OTHERS_BROKEN))
        code, _, err = _exec(project, "bad-tabel")
        assert code == 1
        assert "did you mean 'bad-table'?" in err


class TestOverrides:
    """-o key=value: TOML values, checked and converted like the config."""

    def test_typed_values(self, project: Path) -> None:
        code, data, err = _exec(
            project,
            "good",
            "-o",
            "times=3",
            "-o",
            'urls=["a", "b"]',
            "-o",
            "ratio=2",
            "-o",
            "loud=true",
            "-o",
            'word="quoted"',
        )
        assert code == 0, err
        assert data is not None
        result = data["result"]
        assert (result["times"], result["urls"], result["ratio"], result["loud"]) == (
            3,
            ["a", "b"],
            2,
            True,
        )
        assert result["word"] == "quoted"
        assert result["headers"] == {"Accept": "text/plain"}  # untouched options stay

    def test_bare_word_is_a_string(self, project: Path) -> None:
        code, data, err = _exec(project, "good", "-o", "word=bare/text-1")
        assert code == 0, err
        assert data is not None and data["result"]["word"] == "bare/text-1"

    def test_dotted_key_sets_one_entry_of_a_table(self, project: Path) -> None:
        code, data, err = _exec(project, "good", "-o", "headers.X-Id=7a")
        assert code == 0, err
        assert data is not None
        assert data["result"]["headers"] == {"Accept": "text/plain", "X-Id": "7a"}

    def test_path_option_is_converted(self, project: Path) -> None:
        code, data, err = _exec(project, "place", "-o", "path=/var")
        assert code == 0, err
        assert data is not None and data["result"] == "PosixPath:/var"

    @pytest.mark.parametrize(
        ("override", "fragments"),
        [
            ("times=three", ["-o times=three", "expected an integer, got a string"]),
            ("tims=3", ["-o tims=3", "unknown option 'tims'", "did you mean 'times'?"]),
            ("urls=[1, 2]", ["-o urls=[1, 2]", "item 0: expected a string"]),
            ('urls=["a", ', ["-o urls=", "not a valid TOML value"]),
            ("loud", ["-o loud", "key=value"]),
            ("=3", ["-o =3", "key"]),
        ],
    )
    def test_bad_overrides_are_clear_errors(
        self, project: Path, override: str, fragments: list[str]
    ) -> None:
        code, data, err = _exec(project, "good", "-o", override)
        assert code == 1
        assert data is None
        for fragment in fragments:
            assert fragment in err, err

    def test_override_too_long(self, project: Path) -> None:
        code, _, err = _exec(project, "good", "-o", "word=" + "x" * 100_000)
        assert code == 1
        assert "longer than" in err

    def test_override_fixes_a_wrong_option_in_the_file(self, project: Path) -> None:
        project.write_text(
            project.read_text()
            + '[jobs.fixable]\ntype = "echo"\nevery = "1h"\noptions = { times = "three" }\n'
        )
        code, _, err = _exec(project, "fixable")
        assert code == 1
        assert "jobs.fixable.options.times: expected an integer" in err
        code, data, err = _exec(project, "fixable", "-o", "times=3")
        assert code == 0, err
        assert data is not None and data["result"]["times"] == 3

    def test_override_does_not_hide_other_wrong_options(self, project: Path) -> None:
        project.write_text(project.read_text() + textwrap.dedent(OTHERS_BROKEN))
        code, _, err = _exec(project, "bad-options", "-o", "times=3")
        assert code == 1
        assert "unknown option 'nope'" in err
        assert "1 error:" in err  # the override fixed `times`


class TestOverrideBounds:
    """An -o is bounded in length and depth, like the config file."""

    def test_deep_value_refused(self, project: Path) -> None:
        code, _, err = _exec(project, "good", "-o", "headers={" + ".".join("a" * 40) + "=1}")
        assert code == 1
        assert "nests more than 28" in err

    def test_deep_arrays_refused(self, project: Path) -> None:
        code, _, err = _exec(project, "good", "-o", "urls=" + "[" * 5000 + "]" * 5000)
        assert code == 1
        assert "-o urls=[[[" in err
