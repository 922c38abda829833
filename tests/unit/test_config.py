"""load_config: TOML file -> frozen, validated Config; every problem reported at once, with
file, line, key path and a suggestion where one is close."""

from __future__ import annotations

import calendar
import dataclasses
import grp
import inspect
import os
import random
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from taskd.config import Config, DaemonConfig, JobConfig, load_config
from taskd.config.source import MAX_CONFIG_BYTES
from taskd.errors import ConfigError, ConfigIssue, TaskdError

Write = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """``write(text, name="taskd.toml")`` -> path of a dedented config file in tmp_path."""

    def create(text: str | bytes, name: str = "taskd.toml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return create


def issues(path: Path) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.issues, "a ConfigError must carry at least one issue"
    for issue in info.value.issues:
        assert issue.file == str(path)
    return info.value.issues


def issue_at(path: Path, key: str) -> ConfigIssue:
    found = [i for i in issues(path) if i.path == key]
    assert len(found) == 1, f"expected one issue at {key}, got {issues(path)}"
    return found[0]


def utc(*fields: int) -> float:
    return float(calendar.timegm((*fields, 0)[:6]))


JOB = '[jobs.j]\ntype = "x"\n'  # lines 1-2 of a one-job file


FULL = """
[daemon]
plugin_dirs = ["plugins.d", "/opt/taskd/plugins", "more/plugins"]
state_dir = "state"
runtime_dir = "/run/taskd-test"
log_level = "debug"
log_format = "json"
process_workers = 3
thread_workers = 16
shutdown_timeout = "1m30s"
timezone = "Europe/Berlin"
metrics_address = "127.0.0.1:9464"
entry_points = false
disabled_plugins = ["noisy", "old_thing"]

[jobs.site-up]
type = "http_check"
every = "30s"
jitter = "250ms"
timeout = "10s"
retries = 2
retry_backoff = "1s"
overlap = "queue"
catchup = "all"
grace = "5m"
enabled = false
[jobs.site-up.options]
urls = ["https://example.org/health"]
limit = 3

[jobs.nightly]
type = "checksum"
cron = "30 2 * * *"
timezone = "America/New_York"
max_memory = "512MiB"
timeout = 90

[jobs.once]
type = "command"
at = 2026-12-01T09:00:00+01:00

[jobs.boot]
type = "command"
on = "startup"
grace = 1.5
"""


class TestValidConfig:
    """A correct file loads into frozen objects with paths, durations and sizes converted."""

    def test_full_config(self, write: Write) -> None:
        path = write(FULL)
        cfg = load_config(path)
        base = path.parent
        assert isinstance(cfg, Config)
        assert cfg.path == path
        assert cfg.daemon == DaemonConfig(
            plugin_dirs=(base / "plugins.d", Path("/opt/taskd/plugins"), base / "more/plugins"),
            state_dir=base / "state",
            runtime_dir=Path("/run/taskd-test"),
            log_level="debug",
            log_format="json",
            process_workers=3,
            thread_workers=16,
            shutdown_timeout=90.0,
            timezone="Europe/Berlin",
            metrics_address="127.0.0.1:9464",
            entry_points=False,
            disabled_plugins=("noisy", "old_thing"),
        )
        assert list(cfg.jobs) == ["site-up", "nightly", "once", "boot"]
        site = cfg.jobs["site-up"]
        assert site == JobConfig(
            name="site-up",
            type="http_check",
            schedule="every",
            every=30.0,
            timezone="Europe/Berlin",  # inherited from [daemon]
            jitter=0.25,
            timeout=10.0,
            retries=2,
            retry_backoff=1.0,
            overlap="queue",
            catchup="all",
            grace=300.0,
            enabled=False,
            options={"urls": ["https://example.org/health"], "limit": 3},
        )
        assert cfg.line_of("jobs.site-up") == 15
        nightly = cfg.jobs["nightly"]
        assert (nightly.schedule, nightly.cron, nightly.every) == ("cron", "30 2 * * *", None)
        assert nightly.timezone == "America/New_York"
        assert nightly.max_memory == 512 * 2**20
        assert nightly.timeout == 90.0
        assert cfg.line_of("jobs.nightly") == 30
        once = cfg.jobs["once"]
        assert once.schedule == "at"
        assert once.at == utc(2026, 12, 1, 8, 0, 0)
        boot = cfg.jobs["boot"]
        assert boot.schedule == "startup"
        assert (boot.every, boot.cron, boot.at) == (None, None, None)
        assert boot.grace == 1.5

    def test_defaults(self, write: Write) -> None:
        cfg = load_config(write(JOB + 'every = "5m"\n'))
        assert cfg.daemon == DaemonConfig()
        job = cfg.jobs["j"]
        assert job == JobConfig(name="j", type="x", schedule="every", every=300.0)
        assert (job.jitter, job.timeout, job.retries, job.retry_backoff) == (0.0, None, 0, 1.0)
        assert (job.overlap, job.catchup, job.grace, job.enabled) == ("skip", "latest", 60.0, True)
        assert job.max_memory is None
        assert dict(job.options) == {}

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ('"250ms"', 0.25),
            ('"30s"', 30.0),
            ('"5m"', 300.0),
            ('"1h30m"', 5400.0),
            ("45", 45.0),
            ("0.5", 0.5),
        ],
    )
    def test_durations(self, write: Write, text: str, seconds: float) -> None:
        cfg = load_config(write(JOB + f"every = {text}\ntimeout = {text}\njitter = {text}\n"))
        job = cfg.jobs["j"]
        assert (job.every, job.timeout, job.jitter) == (seconds, seconds, seconds)

    @pytest.mark.parametrize(
        ("text", "size"), [('"512MiB"', 512 * 2**20), ('"2GB"', 2 * 10**9), ("4096", 4096)]
    )
    def test_max_memory_sizes(self, write: Write, text: str, size: int) -> None:
        cfg = load_config(write(JOB + f'every = "1s"\nmax_memory = {text}\n'))
        assert cfg.jobs["j"].max_memory == size

    def test_objects_are_frozen(self, write: Write) -> None:
        cfg = load_config(write(FULL))
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.daemon.log_level = "error"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.jobs["nightly"].every = 5.0  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.path = Path("/elsewhere")  # type: ignore[misc]

    def test_relative_paths_follow_the_file_not_the_cwd(
        self, write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write('[daemon]\nplugin_dirs = ["p"]\nstate_dir = "../state"\n', "etc/taskd.toml")
        elsewhere = tmp_path / "cwd"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        cfg = load_config(Path("../etc/taskd.toml"))
        assert cfg.path.is_absolute()
        (plugin_dir,) = cfg.daemon.plugin_dirs
        assert plugin_dir.is_absolute()
        assert plugin_dir.resolve() == (tmp_path / "etc/p").resolve()
        assert cfg.daemon.state_dir.resolve() == (tmp_path / "state").resolve()

    def test_home_is_expanded(self, write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOME", "/home/operator")
        cfg = load_config(write('[daemon]\nstate_dir = "~/taskd"\n'))
        assert cfg.daemon.state_dir == Path("/home/operator/taskd")

    @pytest.mark.parametrize(
        "cron", ["*/15 * * * *", "0 3 * * 1-5", "*/10 * * * * *", "@daily", "0 0 1 jan *"]
    )
    def test_cron_forms(self, write: Write, cron: str) -> None:
        cfg = load_config(write(JOB + f'cron = "{cron}"\ntimezone = "Europe/Berlin"\n'))
        assert cfg.jobs["j"].cron == cron

    @pytest.mark.parametrize(
        "name", ["a", "9lives", "site-up", "db.backup", "under_score", "x" * 100, "A-1.b_2"]
    )
    def test_good_job_names(self, write: Write, name: str) -> None:
        cfg = load_config(write(f'[jobs."{name}"]\ntype = "x"\nevery = "1s"\n'))
        assert list(cfg.jobs) == [name]

    def test_inline_and_dotted_job_tables(self, write: Write) -> None:
        cfg = load_config(
            write(
                """
                [jobs]
                a = { type = "x", every = "1s", options = { k = 1 } }
                b.type = "y"
                b.cron = "0 * * * *"
                """
            )
        )
        assert cfg.jobs["a"].every == 1.0
        assert dict(cfg.jobs["a"].options) == {"k": 1}
        assert cfg.jobs["b"].cron == "0 * * * *"


class TestEmptyAndOddFiles:
    """Empty is valid; anything that is not TOML text is a clean ConfigError naming the file."""

    @pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "[daemon]\n", "[jobs]\n"])
    def test_empty_is_valid_with_no_jobs(self, write: Write, text: str) -> None:
        cfg = load_config(write(text))
        assert dict(cfg.jobs) == {}
        assert cfg.daemon == DaemonConfig()

    @pytest.mark.parametrize(
        ("content", "fragment"),
        [
            (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", "not UTF-8 text (byte 0)"),
            (b'a = "\xff\xfe"\n', "not UTF-8 text (byte 5)"),
            (b"[daemon]\nlog_level = 'info'\x00\n", "NUL bytes"),
            (b"\x00" * 64, "NUL bytes"),
            (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "a config file is TOML text"),
            (random.Random(1234).randbytes(8192), "a config file is TOML text"),
        ],
    )
    def test_binary(self, write: Write, content: bytes, fragment: str) -> None:
        path = write(content)
        (issue,) = issues(path)
        assert fragment in issue.message
        assert issue.path == ""
        assert str(path) in str(issue)

    @pytest.mark.parametrize(
        ("text", "line"),
        [
            ("this is not toml\n", 1),
            ("[daemon]\nlog_level = \n", 2),
            ('[daemon]\nlog_level = "info"\nlog_level = "debug"\n', 3),
            ('[jobs.x]\ntype = "a"\n[jobs.x]\ntype = "b"\n', 3),
            ("[daemon\n", 1),
            ('a = 1\nb = 2\n\nkey = "unterminated\n', 4),
        ],
    )
    def test_not_toml_names_the_line(self, write: Write, text: str, line: int) -> None:
        path = write(text)
        (issue,) = issues(path)
        assert issue.message.startswith("not valid TOML: ")
        assert issue.line == line
        assert "(at line" not in issue.message  # the position is in .line, said once
        assert str(issue).startswith(f"{path}:{line}: ")

    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.toml"
        (issue,) = issues(path)
        assert "not found" in issue.message
        assert "--config" in issue.message
        assert "TASKD_CONFIG" in issue.message

    def test_directory(self, tmp_path: Path) -> None:
        (issue,) = issues(tmp_path)
        assert "is a directory" in issue.message

    def test_huge_file(self, write: Write) -> None:
        path = write(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
        assert path.stat().st_size > MAX_CONFIG_BYTES
        (issue,) = issues(path)
        assert str(MAX_CONFIG_BYTES) in issue.message
        assert "limit" in issue.message

    def test_just_under_the_limit_is_read(self, write: Write) -> None:
        body = b'[jobs.j]\ntype = "x"\nevery = "1s"\n'
        path = write(body + b"#" * (MAX_CONFIG_BYTES - len(body) - 1) + b"\n")
        assert path.stat().st_size == MAX_CONFIG_BYTES
        assert list(load_config(path).jobs) == ["j"]

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_unreadable(self, write: Write) -> None:
        path = write('[daemon]\nlog_level = "info"\n')
        path.chmod(0)
        (issue,) = issues(path)
        assert "cannot read" in issue.message

    @pytest.mark.parametrize(
        "text",
        [
            "a = " + "[" * 100_000,
            "a = " + "[" * 100_000 + "]" * 100_000,
            "a = " + "{b = " * 50_000,
            "a = " + "{b = " * 5000 + "1" + "}" * 5000,
        ],
        ids=["open-arrays", "closed-arrays", "open-tables", "closed-tables"],
    )
    def test_deep_nesting_is_a_config_error(self, write: Write, text: str) -> None:
        path = write(text)
        (issue,) = issues(path)  # never RecursionError
        assert str(path) in str(issue)

    def test_error_is_a_taskd_and_value_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "nope.toml")
        assert isinstance(info.value, TaskdError)
        assert isinstance(info.value, ValueError)
        assert str(tmp_path / "nope.toml") in str(info.value)


class TestErrorLocation:
    """Each issue names the file, the exact line, the key path and a close suggestion."""

    def test_unknown_job_key_with_suggestion(self, write: Write) -> None:
        path = write(
            """
            # backups
            [jobs.backup]
            type = "x"
            every = "1h"
            timout = "10s"
            """
        )
        issue = issue_at(path, "jobs.backup.timout")
        assert issue.line == 5
        assert issue.hint == "did you mean 'timeout'?"
        assert issue.message == "unknown key 'timout' in [jobs.backup]"
        assert str(issue) == (
            f"{path}:5: jobs.backup.timout: unknown key 'timout' in [jobs.backup] "
            "(did you mean 'timeout'?)"
        )

    def test_unknown_daemon_key_with_suggestion(self, write: Write) -> None:
        path = write('[daemon]\nstate_dir = "s"\nlog_levle = "info"\n')
        issue = issue_at(path, "daemon.log_levle")
        assert issue.line == 3
        assert issue.hint == "did you mean 'log_level'?"

    def test_unknown_key_far_from_any_lists_known_keys(self, write: Write) -> None:
        path = write(JOB + 'every = "1s"\nzzzzzz = 1\n')
        issue = issue_at(path, "jobs.j.zzzzzz")
        assert issue.line == 4
        assert issue.hint is not None
        assert "known keys:" in issue.hint
        assert "timeout" in issue.hint
        assert "retry_backoff" in issue.hint

    def test_unknown_top_level_key(self, write: Write) -> None:
        path = write('# header\ndeamon = { log_level = "info" }\n[jobs]\n')
        issue = issue_at(path, "deamon")
        assert issue.line == 2
        assert issue.hint == "did you mean 'daemon'?"
        assert "unknown top-level key 'deamon'" in issue.message

    def test_unknown_top_level_key_without_a_close_match(self, write: Write) -> None:
        path = write('name = "x"\n')
        issue = issue_at(path, "name")
        assert issue.line == 1
        assert issue.hint is not None
        assert "[daemon]" in issue.hint
        assert "[jobs.<name>]" in issue.hint

    def test_overlap_typo(self, write: Write) -> None:
        path = write(JOB + 'every = "1s"\noverlap = "skp"\n')
        issue = issue_at(path, "jobs.j.overlap")
        assert issue.line == 4
        assert "did you mean 'skip'?" in str(issue)
        assert "skip, queue, replace, allow" in issue.message

    def test_catchup_typo(self, write: Write) -> None:
        path = write(JOB + 'every = "1s"\ncatchup = "lates"\n')
        issue = issue_at(path, "jobs.j.catchup")
        assert issue.line == 4
        assert "did you mean 'latest'?" in str(issue)

    def test_offset_auto_and_duration(self, write: Write) -> None:
        path = write(
            '[jobs.a]\ntype = "x"\nevery = "1m"\noffset = "auto"\n'
            '[jobs.b]\ntype = "x"\nevery = "10s"\noffset = "2500ms"\n'
            '[jobs.c]\ntype = "x"\nevery = "10s"\n'
        )
        jobs = load_config(path).jobs
        assert jobs["a"].offset == 43.343  # derived from the name "a" (pinned in test_triggers)
        assert jobs["b"].offset == 2.5
        assert jobs["c"].offset == 0.0  # no offset: ticks on multiples of the interval
        assert jobs["b"].schedule_text() == "every 10s offset 2.5s"

    @pytest.mark.parametrize(
        ("lines", "fragment"),
        [
            ('every = "10s"\noffset = "10s"\n', "must be less than the interval (10s)"),
            ('every = "10s"\noffset = "soon"\n', '"auto" for a phase derived from the job name'),
            ('every = "10s"\noffset = "-1s"\n', "duration"),
            ('cron = "* * * * *"\noffset = "5s"\n', "only to an `every` schedule"),
            ('at = "2030-01-01T00:00:00Z"\noffset = "5s"\n', "only to an `every` schedule"),
        ],
    )
    def test_bad_offset(self, write: Write, lines: str, fragment: str) -> None:
        path = write(JOB + lines)
        issue = issue_at(path, "jobs.j.offset")
        assert issue.line == 4
        assert fragment in str(issue), str(issue)

    def test_log_level_typo(self, write: Write) -> None:
        path = write('[daemon]\nlog_level = "warn"\n')
        issue = issue_at(path, "daemon.log_level")
        assert issue.line == 2
        assert "did you mean 'warning'?" in str(issue)

    def test_key_in_quoted_table_name(self, write: Write) -> None:
        path = write('[jobs."site.up"]\ntype = "x"\nevery = "nope"\n')
        issue = issue_at(path, "jobs.site.up.every")
        assert issue.line == 3

    def test_same_key_in_two_jobs_gets_each_line(self, write: Write) -> None:
        path = write(
            """
            [jobs.a]
            type = "x"
            every = "bad"

            [jobs.b]
            type = "x"
            every = "worse"
            """
        )
        assert issue_at(path, "jobs.a.every").line == 3
        assert issue_at(path, "jobs.b.every").line == 7

    def test_key_in_inline_table_falls_back_to_its_line(self, write: Write) -> None:
        path = write('[jobs]\n\nnightly = { type = "x", every = "bad" }\n')
        assert issue_at(path, "jobs.nightly.every").line == 3

    def test_multiline_string_does_not_confuse_lines(self, write: Write) -> None:
        path = write(
            """
            [jobs.j.options]
            script = \"\"\"
            every = 5
            timout = 1
            \"\"\"
            [jobs.j]
            type = "x"
            every = "bad"
            timout = 1
            """
        )
        assert issue_at(path, "jobs.j.every").line == 8
        assert issue_at(path, "jobs.j.timout").line == 9

    def test_issue_without_a_line_still_prints(self) -> None:
        issue = ConfigIssue("/etc/taskd/taskd.toml", "jobs.a.type", "bad", None, "fix it")
        assert str(issue) == "/etc/taskd/taskd.toml: jobs.a.type: bad (fix it)"


class TestAllErrorsAtOnce:
    """One load reports every mistake in the file, not only the first."""

    def test_four_mistakes_four_issues(self, write: Write) -> None:
        path = write(
            """
            [daemon]
            log_levle = "info"

            [jobs.backup]
            type = "x"
            every = "5x"
            timout = "10s"
            overlap = "skp"
            """
        )
        found = issues(path)
        assert len(found) == 4
        assert {(i.path, i.line) for i in found} == {
            ("daemon.log_levle", 2),
            ("jobs.backup.every", 6),
            ("jobs.backup.timout", 7),
            ("jobs.backup.overlap", 8),
        }

    def test_mistakes_across_daemon_and_many_jobs(self, write: Write) -> None:
        path = write(
            """
            [daemon]
            process_workers = "two"
            timezone = "Europe/Berln"

            [jobs.a]
            type = 5
            every = "1s"

            [jobs.b]
            type = "x"

            [jobs."bad name"]
            type = "x"
            on = "boot"

            [jobs.c]
            type = "x"
            cron = "99 * * * *"
            retries = 1000
            """
        )
        paths = {i.path for i in issues(path)}
        assert paths == {
            "daemon.process_workers",
            "daemon.timezone",
            "jobs.a.type",
            "jobs.b",
            "jobs.bad name",
            "jobs.bad name.on",
            "jobs.c.cron",
            "jobs.c.retries",
        }

    def test_message_lists_every_issue(self, write: Write) -> None:
        path = write(JOB + 'every = "1s"\nretries = -1\njitter = "x"\n')
        with pytest.raises(ConfigError) as info:
            load_config(path)
        text = str(info.value)
        assert f"{path}:4: jobs.j.retries:" in text
        assert f"{path}:5: jobs.j.jitter:" in text
        assert len(text.splitlines()) == 2


DAEMON_TYPES = [
    ("process_workers", '"2"', "expected a whole number, got a string"),
    ("process_workers", "true", "expected a whole number, got a boolean"),
    ("process_workers", "2.0", "expected a whole number, got a float"),
    ("process_workers", "-1", "must be from 0 to 1024"),
    ("thread_workers", "0", "must be from 1 to 1024"),
    ("thread_workers", "100000", "must be from 1 to 1024"),
    ("log_level", "5", "expected a string, got an integer"),
    ("log_level", '"verbose"', "must be one of debug, info, warning, error, critical"),
    ("log_format", '"xml"', "must be one of auto, console, json"),
    ("entry_points", '"yes"', "expected true or false, got a string"),
    ("entry_points", "1", "expected true or false, got an integer"),
    ("plugin_dirs", '"plugins.d"', "expected an array of folder paths, got a string"),
    ("plugin_dirs", "[1]", "expected a string, got an integer"),
    ("plugin_dirs", '[""]', "empty path"),
    ("state_dir", "5", "expected a string, got an integer"),
    ("state_dir", '""', "empty path"),
    ("runtime_dir", "[]", "expected a string, got an array"),
    ("shutdown_timeout", '"forever"', "cannot read 'forever' as a duration"),
    ("shutdown_timeout", "-3", "a duration must be a finite number >= 0"),
    ("loop_block_threshold", "0", "must be more than 0 and at most 60s"),
    ("loop_block_threshold", '"0ms"', "must be more than 0 and at most 60s"),
    ("loop_block_threshold", '"61s"', "must be more than 0 and at most 60s"),
    ("loop_block_threshold", '"2m"', "must be more than 0 and at most 60s"),
    ("loop_block_threshold", '"off"', "cannot read 'off' as a duration"),
    ("loop_block_threshold", "true", "expected a duration"),
    ("loop_block_threshold", "-1", "a duration must be a finite number >= 0"),
    ("timezone", '"Mars/Olympus"', "unknown time zone 'Mars/Olympus'"),
    ("timezone", "1", "expected a string, got an integer"),
    ("metrics_address", '"9464"', 'expected "host:port"'),
    ("metrics_address", '"127.0.0.1:99999"', 'expected "host:port"'),
    ("metrics_address", '"localhost:http"', 'expected "host:port"'),
    ("disabled_plugins", '"x"', "expected an array of strings, got a string"),
    ("control_group", "0", "expected a string, got an integer"),
    ("control_group", '""', "empty group name; create the group or remove control_group"),
    (
        "control_group",
        '"no-such-group-taskd"',
        "no group 'no-such-group-taskd' on this host; create the group or remove control_group",
    ),
    ("disabled_plugins", "[true]", "expected a string, got a boolean"),
]


class TestDaemonTable:
    """Each [daemon] key refuses wrong types and out-of-range values, at its line."""

    @pytest.mark.parametrize(("key", "value", "fragment"), DAEMON_TYPES)
    def test_bad_value(self, write: Write, key: str, value: str, fragment: str) -> None:
        path = write(f"[daemon]\n# settings\n{key} = {value}\n")
        (issue,) = issues(path)
        assert issue.path == f"daemon.{key}"
        assert issue.line == 3
        assert fragment in issue.message

    def test_daemon_not_a_table(self, write: Write) -> None:
        (issue,) = issues(write("daemon = 5\n"))
        assert (issue.path, issue.line) == ("daemon", 1)
        assert "expected a table [daemon], got an integer" in issue.message

    def test_timezone_suggestion(self, write: Write) -> None:
        issue = issue_at(write('[daemon]\ntimezone = "Europe/Berln"\n'), "daemon.timezone")
        assert "did you mean 'Europe/Berlin'?" in str(issue)

    @pytest.mark.parametrize("address", ["127.0.0.1:9464", "localhost:1", "[::1]:65535"])
    def test_good_metrics_addresses(self, write: Write, address: str) -> None:
        cfg = load_config(write(f'[daemon]\nmetrics_address = "{address}"\n'))
        assert cfg.daemon.metrics_address == address

    @pytest.mark.parametrize(
        ("value", "seconds"), [('"200ms"', 0.2), ('"1s"', 1.0), ("0.05", 0.05), ('"60s"', 60.0)]
    )
    def test_loop_block_threshold(self, write: Write, value: str, seconds: float) -> None:
        cfg = load_config(write(f"[daemon]\nloop_block_threshold = {value}\n"))
        assert cfg.daemon.loop_block_threshold == seconds

    def test_loop_block_threshold_defaults_to_250ms(self, write: Write) -> None:
        assert load_config(write("[daemon]\n")).daemon.loop_block_threshold == 0.25

    def test_control_group_that_exists(self, write: Write) -> None:
        name = grp.getgrgid(os.getgid()).gr_name  # "root" when run as root
        cfg = load_config(write(f'[daemon]\ncontrol_group = "{name}"\n'))
        assert cfg.daemon.control_group == name

    def test_control_group_defaults_to_none(self, write: Write) -> None:
        assert load_config(write("[daemon]\n")).daemon.control_group is None

    def test_unknown_control_group_names_file_line_and_key(self, write: Write) -> None:
        path = write('[daemon]\nstate_dir = "s"\ncontrol_group = "no-such-group-taskd"\n')
        text = str(issue_at(path, "daemon.control_group"))
        assert text.startswith(f"{path}:3: daemon.control_group: no group 'no-such-group-taskd'")
        assert "create the group or remove control_group" in text


JOB_TYPES = [
    ("retries", "true", "expected a whole number, got a boolean"),
    ("retries", '"3"', "expected a whole number, got a string"),
    ("retries", "2.5", "expected a whole number, got a float"),
    ("retries", "-1", "must be from 0 to 100"),
    ("retries", "101", "must be from 0 to 100"),
    ("timeout", "0", "must be more than 0"),
    ("timeout", '"0s"', "must be more than 0"),
    ("timeout", "-5", "finite number >= 0"),
    ("timeout", "true", "expected a duration"),
    ("jitter", '"-2s"', "cannot read '-2s' as a duration"),
    ("jitter", "-1", "finite number >= 0"),
    ("retry_backoff", "nan", "finite number >= 0"),
    ("grace", "inf", "finite number >= 0"),
    ("grace", '"soon"', "cannot read 'soon'"),
    ("overlap", "1", "expected a string, got an integer"),
    ("catchup", '"some"', "must be one of none, latest, all"),
    ("enabled", '"yes"', "expected true or false, got a string"),
    ("enabled", "0", "expected true or false, got an integer"),
    ("max_memory", '"lots"', "expected a size"),
    ("max_memory", "0", "must be > 0"),
    ("max_memory", "true", "expected a size"),
    ("options", "5", "expected a table [jobs.j.options], got an integer"),
    ("options", '["a"]', "expected a table [jobs.j.options], got an array"),
    ("timezone", "5", "expected a string, got an integer"),
]


class TestJobTable:
    """Each job key refuses wrong types and ranges; schedules are exactly one of four."""

    @pytest.mark.parametrize(("key", "value", "fragment"), JOB_TYPES)
    def test_bad_value(self, write: Write, key: str, value: str, fragment: str) -> None:
        path = write(JOB + f'every = "1s"\n{key} = {value}\n')
        (issue,) = issues(path)
        assert issue.path == f"jobs.j.{key}"
        assert issue.line == 4
        assert fragment in issue.message

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ('"0s"', "must be more than 0"),
            ("0", "must be more than 0"),
            ('"-5s"', "cannot read '-5s'"),
            ("-5", "finite number >= 0"),
            ('"every day"', "cannot read 'every day'"),
            ("true", "expected a duration"),
            ("[1]", "expected a duration"),
        ],
    )
    def test_bad_every(self, write: Write, value: str, fragment: str) -> None:
        (issue,) = issues(write(JOB + f"every = {value}\n"))
        assert (issue.path, issue.line) == ("jobs.j.every", 3)
        assert fragment in issue.message

    def test_type_missing(self, write: Write) -> None:
        (issue,) = issues(write('[jobs.j]\nevery = "1s"\n'))
        assert issue.path == "jobs.j.type"
        assert issue.line == 1
        assert "missing 'type'" in issue.message

    def test_type_not_a_string(self, write: Write) -> None:
        (issue,) = issues(write('[jobs.j]\nevery = "1s"\ntype = ["a"]\n'))
        assert (issue.path, issue.line) == ("jobs.j.type", 3)
        assert "expected a string, got an array" in issue.message

    def test_no_schedule(self, write: Write) -> None:
        (issue,) = issues(write('# x\n[jobs.j]\ntype = "x"\ntimeout = "5s"\n'))
        assert (issue.path, issue.line) == ("jobs.j", 2)
        assert issue.message == "no schedule"
        assert issue.hint is not None
        for word in ("every", "cron", "at", 'on = "startup"'):
            assert word in issue.hint

    @pytest.mark.parametrize(
        ("lines", "second"),
        [
            ('every = "1s"\ncron = "* * * * *"\n', "cron"),
            ('cron = "* * * * *"\nat = 2026-01-01T00:00:00Z\n', "at"),
            ('every = "1s"\non = "startup"\n', "on"),
            (
                'every = "1s"\ncron = "* * * * *"\nat = 2026-01-01T00:00:00Z\non = "startup"\n',
                "cron",
            ),
        ],
    )
    def test_two_schedules(self, write: Write, lines: str, second: str) -> None:
        (issue,) = issues(write(JOB + lines))
        assert issue.path == f"jobs.j.{second}"
        assert issue.line == 4
        assert "a job has exactly one schedule" in issue.message
        assert "'every'" in issue.message or "'cron'" in issue.message

    @pytest.mark.parametrize("value", ['"boot"', '"Startup"', '""', '" startup"'])
    def test_on_takes_only_startup(self, write: Write, value: str) -> None:
        issue = issue_at(write(JOB + f"on = {value}\n"), "jobs.j.on")
        assert issue.line == 3

    def test_on_of_wrong_type_is_one_issue(self, write: Write) -> None:
        # One mistake, one issue: not also "'on' takes only \"startup\", got ''".
        (issue,) = issues(write(JOB + "on = 1\n"))
        assert (issue.path, issue.line) == ("jobs.j.on", 3)
        assert "expected a string, got an integer" in issue.message

    def test_on_boot_message(self, write: Write) -> None:
        issue = issue_at(write(JOB + 'on = "boot"\n'), "jobs.j.on")
        assert issue.message == "'on' takes only \"startup\", got 'boot'"
        assert issue.hint == "for times use every, cron or at"

    @pytest.mark.parametrize(
        "cron",
        ["99 * * * *", "* * *", "not a cron", "* * * * * * *", "*/0 * * * *", "0 25 * * *", ""],
    )
    def test_bad_cron(self, write: Write, cron: str) -> None:
        (issue,) = issues(write(JOB + f'cron = "{cron}"\n'))
        assert (issue.path, issue.line) == ("jobs.j.cron", 3)
        assert f"invalid cron expression {cron!r}" in issue.message

    def test_cron_not_a_string(self, write: Write) -> None:
        (issue,) = issues(write(JOB + "cron = 5\n"))
        assert (issue.path, issue.line) == ("jobs.j.cron", 3)
        assert "expected a string" in issue.message

    def test_bad_timezone_with_suggestion(self, write: Write) -> None:
        path = write(JOB + 'cron = "0 3 * * *"\ntimezone = "Europe/Berln"\n')
        (issue,) = issues(path)
        assert (issue.path, issue.line) == ("jobs.j.timezone", 4)
        assert "unknown time zone 'Europe/Berln'" in issue.message
        assert "did you mean 'Europe/Berlin'?" in str(issue)

    def test_unknown_timezone_far_from_any(self, write: Write) -> None:
        (issue,) = issues(write(JOB + 'every = "1s"\ntimezone = "Nowhere/Zzzzzzzzz"\n'))
        assert "IANA name" in str(issue)

    @pytest.mark.parametrize(
        "name", ["bad name", "-lead", ".hidden", "a/b", "x" * 101, "ümlaut", "", "semi;colon"]
    )
    def test_bad_job_names(self, write: Write, name: str) -> None:
        path = write(f'# jobs\n[jobs."{name}"]\ntype = "x"\nevery = "1s"\n')
        (issue,) = issues(path)
        assert issue.path == f"jobs.{name}"
        assert issue.line == 2
        assert f"job name {name!r} is not allowed" in issue.message
        assert issue.hint is not None

    def test_trailing_newline_in_a_job_name_is_refused(self, write: Write) -> None:
        (issue,) = issues(write('[jobs."nl\\n"]\ntype = "x"\nevery = "1s"\n'))
        assert "job name 'nl\\n' is not allowed" in issue.message, issue

    def test_bad_name_and_bad_keys_are_all_reported(self, write: Write) -> None:
        path = write('[jobs."a b"]\ntype = "x"\nevery = "1s"\ntimout = 1\n')
        assert {i.path for i in issues(path)} == {"jobs.a b", "jobs.a b.timout"}

    def test_jobs_not_a_table(self, write: Write) -> None:
        (issue,) = issues(write("jobs = 5\n"))
        assert (issue.path, issue.line) == ("jobs", 1)

    def test_jobs_array_of_tables(self, write: Write) -> None:
        (issue,) = issues(write('[[jobs]]\ntype = "x"\n'))
        assert issue.path == "jobs"
        assert "got an array" in issue.message

    def test_job_not_a_table(self, write: Write) -> None:
        (issue,) = issues(write("[jobs]\nj = 5\n"))
        assert (issue.path, issue.line) == ("jobs.j", 2)
        assert "expected a table [jobs.j], got an integer" in issue.message


class TestAt:
    """``at`` takes a full date-time: with offset, local in the job's zone, or an ISO string."""

    @pytest.mark.parametrize(
        ("zone_lines", "value", "epoch"),
        [
            ("", "2026-12-01T09:00:00+01:00", utc(2026, 12, 1, 8, 0, 0)),
            ("", "2026-12-01T09:00:00Z", utc(2026, 12, 1, 9, 0, 0)),
            ("", "2026-12-01 09:00:00", utc(2026, 12, 1, 9, 0, 0)),
            ('timezone = "Europe/Berlin"\n', "2026-07-01T09:00:00", utc(2026, 7, 1, 7, 0, 0)),
            ('timezone = "Europe/Berlin"\n', "2026-01-15T01:00:00", utc(2026, 1, 15, 0, 0, 0)),
            ('timezone = "America/New_York"\n', "2026-12-01T09:00:00", utc(2026, 12, 1, 14, 0, 0)),
            (
                'timezone = "Asia/Kolkata"\n',
                "2026-12-01T09:00:00.5",
                utc(2026, 12, 1, 3, 30, 0) + 0.5,
            ),
            (
                'timezone = "Europe/Berlin"\n',
                "2026-12-01T09:00:00-05:00",
                utc(2026, 12, 1, 14, 0, 0),
            ),
            (
                'timezone = "Europe/Berlin"\n',
                '"2026-12-01T09:00:00+01:00"',
                utc(2026, 12, 1, 8, 0, 0),
            ),
            ('timezone = "Europe/Berlin"\n', '"2026-12-01T09:00:00Z"', utc(2026, 12, 1, 9, 0, 0)),
            ('timezone = "Europe/Berlin"\n', '"2026-07-01T09:00:00"', utc(2026, 7, 1, 7, 0, 0)),
        ],
    )
    def test_epoch(self, write: Write, zone_lines: str, value: str, epoch: float) -> None:
        job = load_config(write(JOB + zone_lines + f"at = {value}\n")).jobs["j"]
        assert job.schedule == "at"
        assert job.at == pytest.approx(epoch, abs=1e-6)

    def test_local_datetime_uses_the_daemon_zone_by_default(self, write: Write) -> None:
        path = write('[daemon]\ntimezone = "Asia/Tokyo"\n' + JOB + "at = 2026-12-01T09:00:00\n")
        assert load_config(path).jobs["j"].at == utc(2026, 12, 1, 0, 0, 0)

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("2026-12-01", "expected a full date-time (date and time)"),
            ("09:00:00", "expected a full date-time (date and time)"),
            ('"tomorrow"', "expected a date-time such as"),
            ('"2026-13-01T09:00:00"', "expected a date-time such as"),
            ("5", "expected a date-time, got an integer"),
            ("true", "expected a date-time, got a boolean"),
        ],
    )
    def test_invalid(self, write: Write, value: str, fragment: str) -> None:
        (issue,) = issues(write(JOB + f"at = {value}\n"))
        assert (issue.path, issue.line) == ("jobs.j.at", 3)
        assert fragment in issue.message

    def test_date_only_string_is_refused_like_a_toml_date(self, write: Write) -> None:
        # A TOML date 2026-12-01 is refused; the same date written as a string must not
        # silently become midnight.
        (issue,) = issues(write(JOB + 'at = "2026-12-01"\n'))
        assert (issue.path, issue.line) == ("jobs.j.at", 3)


class TestPathEdges:
    """Paths that used to raise from deep inside the standard library are config errors."""

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [('"~nosuchuser_taskd/x"', "cannot expand"), ('"state\\u0000x"', "NUL")],
    )
    def test_bad_paths(self, tmp_path: Path, value: str, fragment: str) -> None:
        path = tmp_path / "taskd.toml"
        path.write_text(f"[daemon]\nstate_dir = {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        (issue,) = info.value.issues
        assert issue.path == "daemon.state_dir" and fragment in issue.message


class TestJobConfigInit:
    """JobConfig's own __init__ (each slot set through its descriptor) is the dataclass's:
    every field lands in its own slot, the defaults are the fields', and it stays frozen."""

    def test_every_argument_lands_in_its_field(self) -> None:
        values = {f.name: object() for f in dataclasses.fields(JobConfig)}
        job = JobConfig(**values)
        assert all(getattr(job, name) is value for name, value in values.items())
        assert list(inspect.signature(JobConfig).parameters) == list(values)

    def test_defaults_are_the_fields(self) -> None:
        job = JobConfig(name="j", type="t", schedule="every")
        for f in dataclasses.fields(JobConfig)[3:]:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            assert getattr(job, f.name) == default, f.name
        assert JobConfig(name="a", type="t", schedule="at").options is not job.options

    def test_frozen(self) -> None:
        job = JobConfig(name="j", type="t", schedule="every", every=1.0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            job.every = 2.0  # type: ignore[misc]
        assert dataclasses.replace(job, every=2.0) == JobConfig(
            name="j", type="t", schedule="every", every=2.0
        )
