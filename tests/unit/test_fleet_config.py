"""The ``[fleet]`` table and the job key ``scope`` (issue 10 C5): defaults, and every error
with its file, line, key and hint. Also the password rule they share with sql_query
(taskd.config.secrets)."""

from __future__ import annotations

import dataclasses
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from taskd.config import load_config
from taskd.config.fleet_table import default_sweep
from taskd.config.model import FleetConfig, JobConfig
from taskd.config.secrets import PasswordUnavailable, SecretKeys, read_password
from taskd.errors import ConfigError, ConfigIssue
from taskd.jobspec import JobSpec, make_trigger
from taskd.plugin.jobtype import JobType

Write = Callable[[str], Path]
FLEET = '[fleet]\ndsn = "postgresql://taskd@db.internal/taskd"\n'  # lines 1-2
JOB = '[jobs.j]\ntype = "x"\nevery = "1m"\n'


@pytest.fixture
def write(tmp_path: Path) -> Write:
    def create(text: str) -> Path:
        path = tmp_path / "taskd.toml"
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return create


def issue_at(path: Path, key: str) -> ConfigIssue:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = [i for i in info.value.issues if i.path == key]
    assert len(found) == 1, f"expected one issue at {key}, got {info.value.issues}"
    assert found[0].file == str(path)
    return found[0]


class TestDefaults:
    def test_no_table_no_fleet(self, write: Write) -> None:
        config = load_config(write(JOB))
        assert config.fleet is None
        assert config.jobs["j"].scope == "host"

    def test_the_defaults(self, write: Write) -> None:
        fleet = load_config(write(FLEET)).fleet
        assert fleet == FleetConfig(
            dsn="postgresql://taskd@db.internal/taskd",
            node=socket.gethostname(),
            lease=30.0,
            sweep=5.0,  # lease / 6
            claim_window=3600.0,
            on_owner_lost="retry",
            max_takeovers=3,
            connect_timeout=5.0,
        )
        assert fleet.password_file is None and fleet.password_env is None

    def test_every_key(self, write: Write, tmp_path: Path) -> None:
        fleet = load_config(
            write(
                """
                [fleet]
                dsn = "postgres://taskd@db:5433/taskd?sslmode=require"
                password_file = "secrets/fleet.pw"
                node = "web-3"
                lease = "1m"
                sweep = "20s"
                claim_window = "6h"
                on_owner_lost = "abandon"
                max_takeovers = 0
                connect_timeout = "2s"
                """
            )
        ).fleet
        assert fleet is not None
        # A relative password file is next to the config, as state_dir is.
        assert fleet.password_file == tmp_path / "secrets/fleet.pw"
        assert (fleet.node, fleet.lease, fleet.sweep, fleet.claim_window) == (
            "web-3",
            60.0,
            20.0,
            21600.0,
        )
        assert (fleet.on_owner_lost, fleet.max_takeovers, fleet.connect_timeout) == (
            "abandon",
            0,
            2.0,
        )

    @pytest.mark.parametrize(
        ("lease", "sweep"),
        [(3.0, 1.0), (4.0, 1.0), (6.0, 1.0), (30.0, 5.0), (3600.0, 600.0)],
    )
    def test_default_sweep_is_a_sixth_of_the_lease_clamped(
        self, lease: float, sweep: float
    ) -> None:
        assert default_sweep(lease) == sweep
        assert 1.0 <= default_sweep(lease) <= lease / 2

    def test_a_password_env(self, write: Write) -> None:
        fleet = load_config(write(FLEET + 'password_env = "TASKD_FLEET_PW"\n')).fleet
        assert fleet is not None and fleet.password_env == "TASKD_FLEET_PW"

    def test_a_fleet_job(self, write: Write) -> None:
        config = load_config(write(FLEET + JOB + 'scope = "fleet"\noverlap = "allow"\n'))
        assert config.jobs["j"].scope == "fleet"


class TestFleetErrors:
    def test_dsn_is_required(self, write: Write) -> None:
        issue = issue_at(write('[fleet]\nnode = "a"\n'), "fleet.dsn")
        assert issue.line == 1  # the table's line: there is no key to point at
        assert "missing 'dsn'" in issue.message
        assert issue.hint is not None and "postgresql://" in issue.hint

    @pytest.mark.parametrize("dsn", ["mysql://u@h/db", "db.internal/taskd", "postgresql:/h"])
    def test_dsn_must_be_postgresql(self, write: Write, dsn: str) -> None:
        issue = issue_at(write(f'[fleet]\ndsn = "{dsn}"\n'), "fleet.dsn")
        assert issue.line == 2
        assert "postgresql:// or postgres://" in issue.message

    @pytest.mark.parametrize(
        "dsn",
        [
            "postgresql://taskd:hunter2@db/taskd",
            "postgresql://taskd@db/taskd?password=hunter2",
            "postgresql://taskd@db/taskd?pass%77ord=hunter2",
            "postgresql://taskd:hun/ter2@db/taskd",
        ],
    )
    def test_a_password_in_the_dsn_is_an_error_that_never_shows_it(
        self, write: Write, dsn: str
    ) -> None:
        issue = issue_at(write(f'[fleet]\ndsn = "{dsn}"\n'), "fleet.dsn")
        assert "password" in issue.message
        assert "password_file" in issue.message and "password_env" in issue.message
        assert "hunter2" not in str(issue) and "ter2" not in str(issue)

    def test_at_most_one_password_source(self, write: Write) -> None:
        issue = issue_at(
            write(FLEET + 'password_file = "/etc/pw"\npassword_env = "PW"\n'),
            "fleet.password_env",
        )
        assert issue.line == 4
        assert "at most one of password_file and password_env" in issue.message

    @pytest.mark.parametrize("node", ["web 3", "-web", "h/1", "", "x" * 64])
    def test_node_is_a_plain_name(self, write: Write, node: str) -> None:
        issue = issue_at(write(FLEET + f'node = "{node}"\n'), "fleet.node")
        assert issue.line == 3 and "plain name" in issue.message

    def test_a_host_name_that_is_no_plain_name(
        self, write: Write, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(socket, "gethostname", lambda: "my host")
        issue = issue_at(write(FLEET), "fleet.node")
        assert "'my host'" in issue.message
        assert issue.hint is not None and "set node" in issue.hint

    @pytest.mark.parametrize("lease", ['"2s"', '"2h"', '"0s"'])
    def test_lease_bounds(self, write: Write, lease: str) -> None:
        issue = issue_at(write(FLEET + f"lease = {lease}\n"), "fleet.lease")
        assert "from 3s to 1h" in issue.message

    def test_sweep_at_most_half_the_lease(self, write: Write) -> None:
        issue = issue_at(write(FLEET + 'lease = "10s"\nsweep = "6s"\n'), "fleet.sweep")
        assert issue.line == 4
        assert "at most half the lease (5s), got 6s" in issue.message
        assert issue.hint is not None and "lease + sweep" in issue.hint
        assert load_config(write(FLEET + 'lease = "10s"\nsweep = "5s"\n')).fleet is not None

    def test_sweep_not_zero(self, write: Write) -> None:
        issue = issue_at(write(FLEET + "sweep = 0\n"), "fleet.sweep")
        assert "at least 100ms" in issue.message

    def test_on_owner_lost(self, write: Write) -> None:
        issue = issue_at(write(FLEET + 'on_owner_lost = "retyr"\n'), "fleet.on_owner_lost")
        assert "retry, abandon" in issue.message and "did you mean 'retry'?" in issue.message

    @pytest.mark.parametrize(
        ("line", "key", "text"),
        [
            ("max_takeovers = -1", "fleet.max_takeovers", "from 0 to 100"),
            ('max_takeovers = "3"', "fleet.max_takeovers", "whole number"),
            ('claim_window = "0s"', "fleet.claim_window", "at least 1s"),
            ('connect_timeout = "10m"', "fleet.connect_timeout", "to 5m"),
            ("password_env = 'A-B'", "fleet.password_env", "environment variable"),
            ("password_file = ''", "fleet.password_file", "empty path"),
        ],
    )
    def test_value_errors(self, write: Write, line: str, key: str, text: str) -> None:
        issue = issue_at(write(FLEET + line + "\n"), key)
        assert issue.line == 3 and text in issue.message

    def test_unknown_key_is_suggested(self, write: Write) -> None:
        issue = issue_at(write(FLEET + 'leese = "1m"\n'), "fleet.leese")
        assert issue.line == 3
        assert issue.message == "unknown key 'leese' in [fleet]"
        assert issue.hint == "did you mean 'lease'?"

    def test_not_a_table(self, write: Write) -> None:
        issue = issue_at(write('fleet = "postgresql://db/taskd"\n'), "fleet")
        assert "expected a table [fleet]" in issue.message

    def test_a_top_level_typo_suggests_fleet(self, write: Write) -> None:
        issue = issue_at(write('[fleat]\ndsn = "postgresql://db/t"\n'), "fleat")
        assert issue.hint == "did you mean 'fleet'?"


class TestScope:
    def test_fleet_scope_without_a_fleet_table(self, write: Write) -> None:
        issue = issue_at(write(JOB + 'scope = "fleet"\n'), "jobs.j.scope")
        assert issue.line == 4
        assert 'scope = "fleet" needs a [fleet] table' in issue.message
        assert issue.hint is not None and "add a [fleet] table with dsn" in issue.hint

    def test_fleet_scope_with_an_invalid_fleet_table(self, write: Write) -> None:
        path = write('[fleet]\ndsn = "mysql://db/t"\n' + JOB + 'scope = "fleet"\n')
        assert "needs a [fleet] table" in issue_at(path, "jobs.j.scope").message

    def test_unknown_scope(self, write: Write) -> None:
        issue = issue_at(write(JOB + 'scope = "flet"\n'), "jobs.j.scope")
        assert "host, fleet" in issue.message and "did you mean 'fleet'?" in issue.message

    @pytest.mark.parametrize("overlap", ["queue", "replace"])
    def test_fleet_overlap_only_skip_or_allow(self, write: Write, overlap: str) -> None:
        issue = issue_at(
            write(FLEET + JOB + f'scope = "fleet"\noverlap = "{overlap}"\n'), "jobs.j.overlap"
        )
        assert issue.line == 7
        assert f'overlap = "{overlap}" cannot be used with scope = "fleet"' in issue.message
        assert issue.hint is not None and '"skip"' in issue.hint and '"allow"' in issue.hint

    def test_fleet_on_startup(self, write: Write) -> None:
        path = write(FLEET + '[jobs.j]\ntype = "x"\non = "startup"\nscope = "fleet"\n')
        issue = issue_at(path, "jobs.j.on")
        assert issue.line == 5
        assert 'on = "startup" cannot be used with scope = "fleet"' in issue.message
        assert issue.hint is not None and "every, cron or at" in issue.hint

    def test_host_scope_keeps_every_overlap(self, write: Write) -> None:
        for overlap in ("queue", "replace"):
            text = JOB + f'scope = "host"\noverlap = "{overlap}"\n'
            assert load_config(write(text)).jobs["j"].overlap == overlap

    def test_a_scope_change_is_a_change(self) -> None:
        async def func(ctx: object) -> None:
            return None

        host = JobConfig(name="j", type="t", schedule="every", every=1.0)
        fleet = dataclasses.replace(host, scope="fleet")
        jt = JobType("t", func)
        a, b = JobSpec(host, jt, make_trigger(host)), JobSpec(fleet, jt, make_trigger(fleet))
        assert host != fleet and not a.same_as(b)
        # Only a host job takes the fused run path: a fleet job's run is claimed first.
        assert a.fast and not b.fast


class TestSecrets:
    KEYS = SecretKeys(dsn="the DSN", file="password_file", env="password_env", prefix="x: ")

    def test_the_files_first_line(self, tmp_path: Path) -> None:
        pw = tmp_path / "pw"
        pw.write_text("s3cret\nrotated by ops on Monday\n")
        assert read_password(str(pw), None, self.KEYS) == "s3cret"

    def test_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TASKD_T_PW", "s3cret")
        assert read_password(None, "TASKD_T_PW", self.KEYS) == "s3cret"
        assert read_password(None, None, self.KEYS) is None

    def test_what_cannot_give_a_password(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        empty = tmp_path / "empty"
        empty.write_text("\nsecond line\n")
        monkeypatch.setenv("TASKD_T_EMPTY", "")
        monkeypatch.delenv("TASKD_T_NONE", raising=False)
        cases = [
            ((str(tmp_path / "missing"), None), "x: password_file"),
            ((str(empty), None), "first line is empty"),
            ((None, "TASKD_T_EMPTY"), "'TASKD_T_EMPTY' is empty"),
            ((None, "TASKD_T_NONE"), "'TASKD_T_NONE' is not set"),
        ]
        for (file, env), text in cases:
            with pytest.raises(PasswordUnavailable, match=text):
                read_password(file, env, self.KEYS)
        with pytest.raises(ValueError, match="at most one"):
            read_password(str(empty), "TASKD_T_EMPTY", self.KEYS)
