"""The bundled command plugin: real subprocesses, on both event loops the daemon may use."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import structlog
import uvloop

import taskd
from taskd.testing import make_context

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a coroutine to completion on a fresh loop of each kind: the daemon runs on uvloop,
    and subprocess handling (child watching, process groups) is the loop's own code."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coro: Coroutine[Any, Any, T]) -> T:
        loop = factory()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return run


@pytest.fixture
def cmd(load_plugin: Callable[[str], types.ModuleType]) -> types.ModuleType:
    return load_plugin("command")


def _descendants() -> set[psutil.Process]:
    return set(psutil.Process().children(recursive=True))


def _is_dead(p: psutil.Process) -> bool:
    # Killed processes reparented to a PID 1 that does not reap (as in many containers) stay
    # zombies: dead, only not yet waited for.
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still alive after up to 2 s. A killed process is not gone at once:
    it has closed its pipes (the run saw EOF) a moment before the kernel makes it a zombie.
    Nothing here would die of itself within the 2 s: the sleeps last 100 s."""
    deadline = time.monotonic() + 2.0
    while (alive := [p for p in procs if not _is_dead(p)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


def _sleep_arg() -> str:
    """A duration no other process is sleeping for, to find this test's sleeps by: a shell's
    background jobs are no longer our descendants once the shell has exited."""
    return f"100.{uuid.uuid4().int % 10**9:09d}"


def _sleeping(arg: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] == ["sleep", arg] and not _is_dead(p):
            found.append(p)
    return found


async def _until_sleeping(arg: str, count: int) -> list[psutil.Process]:
    """Wait (up to 5 s) for ``count`` processes running ``sleep <arg>``; return those found."""
    procs: list[psutil.Process] = []
    for _ in range(500):
        procs = _sleeping(arg)
        if len(procs) >= count:
            break
        await asyncio.sleep(0.01)
    return procs


async def _cancel_when_running(
    job: Coroutine[Any, Any, Any], arg: str, sleeps: int
) -> tuple[list[psutil.Process], BaseException | None]:
    """Run ``job``; once ``sleeps`` processes run ``sleep <arg>``, cancel it as the daemon does
    on a timeout. Returns those processes, the shell too if still ours, and what awaiting the
    job raised."""
    before = _descendants()
    task = asyncio.ensure_future(job)
    procs = await _until_sleeping(arg, sleeps)
    found = len(procs)
    procs += [p for p in _descendants() - before if p not in procs]
    task.cancel()
    try:
        await task
    except BaseException as exc:
        raised: BaseException | None = exc
    else:
        raised = None
    assert found == sleeps, f"expected {sleeps} 'sleep {arg}' processes, found {found}"
    return procs, raised


class TestRegistration:
    """The hook offers one io job type with TOML-typed options."""

    def test_job_type(
        self,
        cmd: types.ModuleType,
        job_types: Callable[[types.ModuleType], list[taskd.JobType]],
        options_contract: Callable[[taskd.JobType], None],
    ) -> None:
        (job,) = job_types(cmd)
        assert (job.name, job.kind, job.func) == ("command", "io", cmd.command)
        options_contract(job)


class TestOutput:
    """What the command writes comes back in the result."""

    def test_shell_command(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        async def main() -> dict[str, Any]:
            result: dict[str, Any] = await cmd.command(make_context(), cmd="echo out; echo err >&2")
            return result

        result = run(main())
        assert {k: result[k] for k in ("exit_code", "stdout", "stderr")} == {
            "exit_code": 0,
            "stdout": "out\n",
            "stderr": "err\n",
        }
        assert (result["stdout_bytes"], result["stderr_bytes"]) == (4, 4)
        assert result["seconds"] >= 0
        assert json.loads(json.dumps(result)) == result

    def test_argv_is_not_given_to_a_shell(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        result = run(cmd.command(make_context(), argv=["echo", "$HOME", "a;b"]))
        assert result["stdout"] == "$HOME a;b\n"

    def test_env_and_cwd(self, cmd: types.ModuleType, run: Run[Any], tmp_path: Path) -> None:
        result = run(
            cmd.command(
                make_context(), cmd='echo "$TASKD_X"; pwd', cwd=str(tmp_path), env={"TASKD_X": "y"}
            )
        )
        assert result["stdout"] == f"y\n{tmp_path}\n"

    def test_environment_is_inherited(
        self, cmd: types.ModuleType, run: Run[Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TASKD_INHERITED", "yes")
        result = run(cmd.command(make_context(), cmd='echo "$TASKD_INHERITED$TASKD_X"', env={}))
        assert result["stdout"] == "yes\n"

    def test_stdin_is_not_the_daemons(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        # cat would wait forever on an inherited terminal; /dev/null gives it EOF at once.
        assert run(cmd.command(make_context(), cmd="cat"))["stdout"] == ""

    def test_keeps_the_tail(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        result = run(cmd.command(make_context(), cmd="printf 0123456789", max_output=4))
        assert (result["stdout"], result["stdout_bytes"]) == ("6789", 10)

    def test_tail_cut_inside_a_character(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        # Five bytes of "ééééé" (two bytes each) start mid-character: the stray byte is dropped.
        result = run(cmd.command(make_context(), argv=["printf", "ééééé"], max_output=5))
        assert result["stdout"] == "éé"

    @pytest.mark.timeout(20)
    def test_large_output_on_both_pipes(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        # 4 MiB to stderr before a byte to stdout, then 4 MiB to stdout: reading one pipe to
        # its end before the other would deadlock on the first full pipe buffer.
        size = 4 * 1024 * 1024
        script = (
            "import sys\n"
            f"sys.stderr.buffer.write(b'e' * {size}); sys.stderr.flush()\n"
            f"sys.stdout.buffer.write(b'o' * ({size} - 3) + b'end')\n"
        )
        result = run(cmd.command(make_context(), argv=[sys.executable, "-c", script]))
        assert (result["stdout_bytes"], result["stderr_bytes"]) == (size, size)
        assert len(result["stdout"]) == 64 * 1024
        assert result["stdout"].endswith("oend")
        assert set(result["stderr"]) == {"e"}

    def test_logs_start_and_finish_at_debug(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        async def main() -> None:
            await cmd.command(make_context("nightly"), cmd="true")

        with structlog.testing.capture_logs() as logs:
            run(main())
        started, finished = logs
        assert started["event"] == "command started"
        assert started["log_level"] == "debug"
        assert started["job"] == "nightly"
        assert started["command"] == "true"
        assert (finished["event"], finished["exit_code"]) == ("command finished", 0)


class TestExitCodes:
    """An exit code outside ok_codes fails the run, quoting stderr."""

    def test_nonzero_exit_raises_with_stderr_tail(
        self, cmd: types.ModuleType, run: Run[Any]
    ) -> None:
        script = "echo partial; for i in 1 2 3; do echo line$i >&2; done; exit 3"
        with pytest.raises(RuntimeError, match="exited with code 3") as info:
            run(cmd.command(make_context(), cmd=script))
        assert str(info.value).endswith("stderr tail:\nline1\nline2\nline3")
        assert isinstance(info.value, cmd.CommandFailed)
        assert (info.value.exit_code, info.value.stdout) == (3, "partial\n")

    def test_ok_codes(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        result = run(cmd.command(make_context(), cmd="exit 3", ok_codes=[0, 3]))
        assert result["exit_code"] == 3
        with pytest.raises(RuntimeError, match=r"exited with code 0 \(ok_codes: \[1\]\)"):
            run(cmd.command(make_context(), cmd="true", ok_codes=[1]))

    def test_killed_by_a_signal(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        with pytest.raises(RuntimeError, match=r"(?s)was killed by SIGKILL .*\(no stderr\)"):
            run(cmd.command(make_context(), cmd="kill -KILL $$"))

    def test_error_pickles_with_its_details(self, cmd: types.ModuleType) -> None:
        import pickle

        err = cmd.CommandFailed("boom", 2, "out", "err")
        copy = pickle.loads(pickle.dumps(err))
        assert (str(copy), copy.exit_code, copy.stdout, copy.stderr) == ("boom", 2, "out", "err")


class TestBadOptions:
    """Bad options fail with a message naming the option or the program."""

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({}, "exactly one of option 'cmd' and option 'argv'"),
            ({"cmd": "true", "argv": ["true"]}, "exactly one of"),
            ({"argv": []}, "empty list"),
            ({"cmd": "true", "max_output": -1}, "'max_output' must be >= 0"),
            ({"cmd": "true", "kill_grace": -1.0}, "'kill_grace' must be >= 0"),
        ],
    )
    def test_rejected(
        self, cmd: types.ModuleType, run: Run[Any], options: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            run(cmd.command(make_context(), **options))

    def test_missing_program(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        with pytest.raises(FileNotFoundError, match="cannot run 'no-such-program-x': program"):
            run(cmd.command(make_context(), argv=["no-such-program-x"]))

    def test_missing_cwd(self, cmd: types.ModuleType, run: Run[Any], tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="option 'cwd'"):
            run(cmd.command(make_context(), cmd="true", cwd=str(tmp_path / "nope")))


class TestCancellation:
    """A cancelled run (timeout, shutdown) takes the command's whole process group with it."""

    def test_shell_and_its_background_jobs_are_killed(
        self, cmd: types.ModuleType, run: Run[Any]
    ) -> None:
        arg = _sleep_arg()

        async def main() -> tuple[list[psutil.Process], BaseException | None]:
            job = cmd.command(make_context(), cmd=f"sleep {arg} & sleep {arg}", kill_grace=5.0)
            return await _cancel_when_running(job, arg, sleeps=2)

        procs, raised = run(main())
        assert isinstance(raised, asyncio.CancelledError)
        assert _alive(procs) == []

    def test_sigterm_ignored_then_sigkill(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        # An ignored signal stays ignored across fork and exec: nothing here obeys SIGTERM.
        arg = _sleep_arg()

        async def main() -> tuple[list[psutil.Process], BaseException | None]:
            job = cmd.command(
                make_context(), cmd=f"trap '' TERM; sleep {arg} & sleep {arg}", kill_grace=0.2
            )
            return await _cancel_when_running(job, arg, sleeps=2)

        procs, raised = run(main())
        assert isinstance(raised, asyncio.CancelledError)
        assert _alive(procs) == []

    def test_sigterm_first_lets_the_command_clean_up(
        self, cmd: types.ModuleType, run: Run[Any], tmp_path: Path
    ) -> None:
        arg = _sleep_arg()
        marker = tmp_path / "cleaned-up"
        script = f"trap 'echo bye > {marker}; exit 0' TERM; sleep {arg} & wait"

        async def main() -> tuple[list[psutil.Process], BaseException | None]:
            job = cmd.command(make_context(), cmd=script, kill_grace=10.0)
            return await _cancel_when_running(job, arg, sleeps=1)

        procs, raised = run(main())
        assert isinstance(raised, asyncio.CancelledError)
        assert marker.read_text() == "bye\n"
        assert _alive(procs) == []

    def test_background_job_holding_the_pipe_after_the_shell_exits(
        self, cmd: types.ModuleType, run: Run[Any]
    ) -> None:
        # The shell exits at once; its background sleep keeps stdout open, so the run lasts
        # until cancelled, and the group is killed although its leader is long gone.
        arg = _sleep_arg()

        async def main() -> tuple[list[psutil.Process], BaseException | None]:
            job = cmd.command(make_context(), cmd=f"sleep {arg} &", kill_grace=5.0)
            return await _cancel_when_running(job, arg, sleeps=1)

        procs, raised = run(main())
        assert isinstance(raised, asyncio.CancelledError)
        assert _alive(procs) == []

    def test_wait_for_timeout(self, cmd: types.ModuleType, run: Run[Any]) -> None:
        # The daemon's timeout: wait_for cancels the job and waits for its cleanup to finish.
        arg = _sleep_arg()

        async def main() -> list[psutil.Process]:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    cmd.command(make_context(), cmd=f"sleep {arg} & sleep {arg}"), timeout=0.5
                )
            return _sleeping(arg)

        assert _alive(run(main())) == []

    def test_cancelled_before_the_spawn_returned(
        self, cmd: types.ModuleType, run: Run[Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # asyncio connects the pipes after the child started; cancelled then, asyncio would
        # kill the shell alone. Here the spawn is held open until the shell's jobs run.
        arg = _sleep_arg()
        real_spawn = cmd._spawn

        async def slow_spawn(*args: Any) -> Any:
            proc = await real_spawn(*args)
            await _until_sleeping(arg, 2)
            running.set()
            await asyncio.sleep(0.1)
            return proc

        monkeypatch.setattr(cmd, "_spawn", slow_spawn)

        async def main() -> list[psutil.Process]:
            task = asyncio.ensure_future(
                cmd.command(make_context(), cmd=f"sleep {arg} & sleep {arg}", kill_grace=5.0)
            )
            await running.wait()
            procs = _sleeping(arg)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return procs

        running = asyncio.Event()
        procs = run(main())
        assert len(procs) == 2
        assert _alive(procs) == []

    def test_a_process_that_left_the_group_does_not_hang_the_stop(
        self, cmd: types.ModuleType, run: Run[Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # setsid: a session of its own, out of reach of the group kill, holding the pipes.
        monkeypatch.setattr(cmd, "_REAP_TIMEOUT", 0.3)
        arg, escaped_arg = _sleep_arg(), _sleep_arg()
        script = f"setsid sleep {escaped_arg} & sleep {arg}"

        async def main() -> tuple[list[psutil.Process], BaseException | None]:
            job = cmd.command(make_context(), cmd=script, kill_grace=0.2)
            return await _cancel_when_running(job, arg, sleeps=1)

        try:
            procs, raised = run(main())
            assert isinstance(raised, asyncio.CancelledError)
            escaped = _sleeping(escaped_arg)
            assert len(escaped) == 1
            assert _alive([p for p in procs if p not in escaped]) == []
            # Not ours to kill any more, but the run let go of it: no transport left open.
            gc.collect()
        finally:
            for p in _sleeping(escaped_arg):
                p.kill()

    def test_signalling_a_vanished_group_is_not_an_error(self, cmd: types.ModuleType) -> None:
        proc = subprocess.Popen(["true"], start_new_session=True)
        proc.wait()
        assert cmd._signal_group(proc.pid, signal.SIGTERM) is False
        assert os.getpgid(0) != proc.pid
