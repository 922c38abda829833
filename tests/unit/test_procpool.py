"""ProcessPool against real worker processes: results, errors, deaths, timeouts, limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import itertools
import math
import os
import pickle
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvloop
from structlog.testing import capture_logs

from taskd.errors import JobError, JobTimeout, MemoryLimitExceeded, ResultTooLarge, WorkerDied
from taskd.plugin.dropin import digest
from taskd.run.encoding import NO_RESULT, Encoded
from taskd.run.limits import recall
from taskd.run.pool import ProcessPool, forkserver, records
from tests.unit.procpool_funcs import jobs

MiB = 1 << 20

PoolFactory = Callable[..., Awaitable[ProcessPool]]


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    """``await make_pool(workers=2, **kw)`` -> a started pool, killed and reaped after the test."""
    made: list[ProcessPool] = []

    async def create(workers: int = 2, **kw: Any) -> ProcessPool:
        pool = ProcessPool(workers, **kw)
        made.append(pool)
        await pool.start()
        return pool

    yield create
    for pool in made:
        pool.kill()
        await pool.close()
        assert pool.pids() == []


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def read_pid(path: Path) -> int:
    return int(path.read_text())


async def wait_for_pid(path: Path) -> int:
    await wait_until(path.exists)
    return read_pid(path)


def load_by_path(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load ``path`` under a synthetic module name, the way the drop-in loader does."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps yet counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


def signal_mask(pid: int, field: str) -> int:
    """A signal set of ``pid`` from /proc (``SigBlk``, ``SigIgn``, ``SigCgt``)."""
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line.split()[1] for line in fh if line.startswith(f"{field}:")), 16)


def bits(*sigs: int) -> int:
    return sum(1 << (sig - 1) for sig in sigs)


DAEMON_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


def fork_and_wait(path: str, seconds: float) -> int:
    """A job that forks without exec, as a multiprocessing "fork" child does, and waits for
    the child, which writes its pid to ``path`` and sleeps; return the child's exit code.
    (Here, not in procpool_funcs: only one test needs it.)"""
    pid = os.fork()
    if pid == 0:
        try:
            # Only once it runs: CPython drops a signal that comes between fork() and its
            # own after-fork reset.
            jobs.report_pid_and_sleep(path, seconds)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def count_starts(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the time of every worker process start from now on."""
    starts: list[float] = []
    real = forkserver.start_process

    def counting(*args: Any) -> Any:
        starts.append(time.monotonic())
        return real(*args)

    monkeypatch.setattr(forkserver, "start_process", counting)
    return starts


class TestResults:
    """Arguments go to the worker and results come back intact."""

    async def test_args_kwargs_and_result_round_trip(self, make_pool: PoolFactory) -> None:
        pool = await make_pool()
        assert await pool.run(jobs.add, (2, 3)) == 5
        nested = {"a": [1, 2.5, None], "b": ("x", b"y"), "c": {1, 2}}
        assert await pool.run(jobs.echo, (1, nested), {"key": "v"}) == ((1, nested), {"key": "v"})

    async def test_big_arguments_and_results(self, make_pool: PoolFactory) -> None:
        pool = await make_pool()
        assert await pool.run(jobs.length, (b"z" * (8 * MiB),)) == 8 * MiB
        assert await pool.run(jobs.make_bytes, (8 * MiB,)) == b"\xab" * (8 * MiB)

    async def test_a_result_over_max_result_fails_in_the_worker(
        self, make_pool: PoolFactory
    ) -> None:
        pool = await make_pool(workers=1)
        pids = pool.pids()
        with pytest.raises(
            ResultTooLarge, match=r"is 2097\d{3} bytes pickled, over max_result_size=1048576"
        ):
            await pool.run(jobs.make_bytes, (2 * MiB,), max_result=MiB)
        # Not the worker's fault: it serves on.
        assert await pool.run(jobs.make_bytes, (MiB - 100,), max_result=MiB) == b"\xab" * (
            MiB - 100
        )
        assert pool.pids() == pids

    async def test_run_measured_judges_the_json_text_in_the_worker(
        self, make_pool: PoolFactory
    ) -> None:
        pool = await make_pool(workers=1)
        pids = pool.pids()
        # A few KB pickled, a gigabyte of JSON: refused in the worker, never built there.
        with pytest.raises(ResultTooLarge, match=r"is more than 1048576 bytes as JSON"):
            await pool.run_measured(jobs.shared_rows, (1000, 1000), max_result=MiB)
        # 200 floats: 1000 bytes of JSON, ~1,800 pickled: pickle's overhead does not count.
        value, encoded = await pool.run_measured(jobs.floats, (200,), max_result=1000)
        assert value == [0.0] * 200 and encoded.size == 1000 and encoded.stored is not None
        with pytest.raises(ResultTooLarge, match=r"is 1005 bytes as JSON"):
            await pool.run_measured(jobs.floats, (201,), max_result=1000)
        value, encoded = await pool.run_measured(jobs.make_bytes, (3,), max_result=1000)
        assert encoded.stored == repr(b"\xab" * 3) and not encoded.serialisable
        assert pool.pids() == pids

    async def test_run_measured_returns_the_result_and_its_stored_form(
        self, make_pool: PoolFactory
    ) -> None:
        pool = await make_pool(workers=1)
        value, encoded = await pool.run_measured(
            jobs.sleep_then, (0, {"a": [1, 2]}), max_result=MiB
        )
        assert value == {"a": [1, 2]}
        assert encoded == Encoded(value, '{"a": [1, 2]}', True, 13)
        assert encoded.stored is value  # a JSON result crosses the pipe once, not twice
        value, encoded = await pool.run_measured(jobs.sleep_then, (0, None), max_result=MiB)
        assert value is None and encoded == NO_RESULT

    async def test_an_exception_with_shared_rows_is_described_within_bounds(
        self, make_pool: PoolFactory
    ) -> None:
        pool = await make_pool(workers=1)
        # No match=: it would call str() on the exception, a gigabyte of text.
        with pytest.raises(ValueError) as info:  # noqa: PT011
            await pool.run(jobs.raise_shared_rows, (1000, 1000))
        # Its pickle is small, so it came back as itself, with the text the worker made:
        # the daemon records that and never calls str() on it.
        text = recall(info.value)
        assert text is not None and text.startswith("ValueError: [['xxx") and len(text) < 4096

    async def test_a_huge_error_message_is_cut_in_the_worker(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1)
        with pytest.raises(JobError) as info:
            await pool.run(jobs.raise_value_error, ("m" * (5 * MiB),))
        # Its 5 MB pickle stayed in the worker: the text came, cut, with the count.
        assert not isinstance(info.value, ValueError)
        assert str(info.value).startswith("ValueError: mmm")
        assert str(info.value).endswith(
            f"... [{5 * MiB + len('ValueError: ') - (4096 - 256)} more characters cut]"
        )
        with pytest.raises(ValueError, match=r"^short\n"):
            await pool.run(jobs.raise_value_error, ("short",))

    async def test_builtins_and_partials(self, make_pool: PoolFactory) -> None:
        pool = await make_pool()
        assert await pool.run(math.factorial, (10,)) == 3628800
        assert await pool.run(functools.partial(jobs.add, 40), (2,)) == 42

    async def test_runs_beyond_worker_count_queue_and_all_complete(
        self, make_pool: PoolFactory
    ) -> None:
        pool = await make_pool()
        tasks = [start(pool.run(jobs.add, (i, i))) for i in range(200)]
        await asyncio.sleep(0)
        assert (pool.busy, pool.queued) == (2, 198)
        assert await asyncio.gather(*tasks) == [2 * i for i in range(200)]
        assert (pool.busy, pool.queued, pool.size) == (0, 0, 2)

    async def test_queue_is_fifo(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1)
        finished: list[int] = []
        tasks = [start(pool.run(jobs.add, (i, 0))) for i in range(20)]
        for task in tasks:
            task.add_done_callback(lambda t: finished.append(t.result()))
        await asyncio.gather(*tasks)
        assert finished == list(range(20))

    async def test_run_before_start_is_an_error(self) -> None:
        with pytest.raises(RuntimeError, match="start"):
            await ProcessPool(1).run(jobs.add, (1, 1))

    async def test_unpicklable_argument_fails_in_caller(self, make_pool: PoolFactory) -> None:
        pool = await make_pool()
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            await pool.run(lambda: 1)
        assert pool.busy == 0
        assert await pool.run(jobs.add, (1, 1)) == 2


class TestJobErrors:
    """A job's exception or bad result fails its run only; the worker lives on."""

    async def test_exception_keeps_type_and_gets_remote_traceback(
        self, make_pool: PoolFactory
    ) -> None:
        pool = await make_pool(workers=1)
        pids = pool.pids()
        with pytest.raises(ValueError, match="bad input") as info:
            await pool.run(jobs.raise_value_error, ("bad input",))
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert f"worker process {pids[0]}" in notes
        assert "raise_value_error" in notes
        assert "Traceback" in notes
        assert pool.pids() == pids
        assert await pool.run(jobs.add, (1, 2)) == 3

    @pytest.mark.parametrize(
        ("func", "args", "message"),
        [
            (jobs.raise_system_exit, (3,), "SystemExit: 3"),
            (jobs.raise_keyboard_interrupt, (), "KeyboardInterrupt"),
            (jobs.raise_unpicklable, ("held a lock",), "UnpicklableError: held a lock"),
            (jobs.raise_two_arg, (), "TwoArgError: 1 and 2"),
            (jobs.raise_stop_iteration, (), "StopIteration: done"),
            (jobs.return_unpicklable, (), "the result (lock) could not be pickled: TypeError"),
        ],
        ids=[
            "SystemExit",
            "KeyboardInterrupt",
            "unpicklable",
            "not-rebuildable",
            "StopIteration",
            "unpicklable-result",
        ],
    )
    async def test_becomes_job_error(
        self, make_pool: PoolFactory, func: Callable[..., Any], args: tuple[Any, ...], message: str
    ) -> None:
        pool = await make_pool(workers=1)
        pids = pool.pids()
        with pytest.raises(JobError) as info:
            await pool.run(func, args)
        assert type(info.value) is JobError
        assert str(info.value).startswith(message)
        assert "Remote traceback" in "\n".join(getattr(info.value, "__notes__", []))
        assert pool.pids() == pids
        assert await pool.run(jobs.add, (1, 2)) == 3


class TestDropInModules:
    """Functions from files loaded by path under synthetic module names run in workers."""

    async def test_function_and_exception_from_file_loaded_by_path(
        self, make_pool: PoolFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        source = textwrap.dedent(
            """
            import hashlib

            class ChecksumError(Exception):
                pass

            def digest(data: bytes) -> str:
                return hashlib.sha256(data).hexdigest()

            def fail(message: str) -> None:
                raise ChecksumError(message)
            """
        )
        path = tmp_path / "checksum.py"
        path.write_text(source)
        module = load_by_path(
            f"_taskd_dropin_checksum_{digest(path, path.read_bytes())}", path, monkeypatch
        )

        pool = await make_pool()
        results = await asyncio.gather(*(pool.run(module.digest, (b"abc",)) for _ in range(4)))
        assert results == [module.digest(b"abc")] * 4
        with pytest.raises(module.ChecksumError, match="corrupt"):
            await pool.run(module.fail, ("corrupt",))

    async def test_reloaded_file_runs_new_code(
        self, make_pool: PoolFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "versioned.py"
        pool = await make_pool(workers=1)
        for version in ("one", "two"):
            # As the daemon names them: a changed file is a new module (a new content hash).
            path.write_text(f"def which() -> str:\n    return {version!r}\n")
            name = f"_taskd_dropin_versioned_{digest(path, path.read_bytes())}"
            module = load_by_path(name, path, monkeypatch)
            assert await pool.run(module.which) == version

    async def test_file_changed_on_disk_without_reload_fails_clearly(
        self, make_pool: PoolFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "edited.py"
        path.write_text("def which() -> str:\n    return 'loaded'\n")
        name = f"_taskd_dropin_edited_{digest(path, path.read_bytes())}"
        module = load_by_path(name, path, monkeypatch)
        path.write_text("def which() -> str:\n    return 'edited, not reloaded'\n")
        pool = await make_pool(workers=1)  # a fresh worker has to read the file
        with pytest.raises(ImportError, match="changed on disk since the daemon loaded it"):
            await pool.run(module.which)


class TestWorkerDeath:
    """A dying worker fails only its own run and is replaced."""

    @pytest.mark.parametrize("how", ["sigkill", "os_exit", "segfault"])
    async def test_only_its_run_fails(
        self, make_pool: PoolFactory, tmp_path: Path, how: str
    ) -> None:
        pool = await make_pool(workers=2)
        before = set(pool.pids())
        pid_file = tmp_path / "pid"
        doomed: asyncio.Task[Any]
        if how == "sigkill":
            doomed = start(pool.run(jobs.report_pid_and_sleep, (str(pid_file), 30)))
        elif how == "os_exit":
            doomed = start(pool.run(jobs.exit_now, (3,)))
        else:
            doomed = start(pool.run(jobs.segfault))
        neighbour = start(pool.run(jobs.sleep_then, (0.3, "neighbour")))
        queued = start(pool.run(jobs.add, (1, 2)))
        await asyncio.sleep(0)
        assert (pool.busy, pool.queued) == (2, 1)
        if how == "sigkill":
            os.kill(await wait_for_pid(pid_file), signal.SIGKILL)

        with pytest.raises(WorkerDied) as info:
            await doomed
        expected = {"sigkill": "signal SIGKILL", "os_exit": "code 3", "segfault": "signal SIGSEGV"}
        assert expected[how] in str(info.value)
        assert await neighbour == "neighbour"
        assert await queued == 3

        await wait_until(lambda: pool.size == 2)
        after = set(pool.pids())
        assert len(after) == 2
        assert len(after & before) == 1
        if how == "sigkill":
            assert read_pid(pid_file) not in after
        assert await asyncio.gather(*(pool.run(jobs.add, (i, 1)) for i in range(4))) == [1, 2, 3, 4]
        assert pool.restarts == {"died": 1}  # counted by cause, for metrics


class TestSignals:
    """Terminal signals do not reach into runs; workers do not outlive a killed daemon."""

    async def test_workers_lead_their_own_process_group(self, make_pool: PoolFactory) -> None:
        # Ctrl-C, a terminal hang-up or `kill -- -PGID` reach the daemon's group, not the
        # workers': the daemon decides what happens to runs.
        pool = await make_pool(workers=2)
        for pid in pool.pids():
            assert os.getpgid(pid) == pid != os.getpgid(0)

    async def test_timeout_kills_what_the_run_started(
        self, make_pool: PoolFactory, tmp_path: Path
    ) -> None:
        pool = await make_pool(workers=1)
        note = tmp_path / "child"
        run = start(pool.run(jobs.spawn_child_and_sleep, (str(note), 30.0), timeout=1.0))
        await wait_until(lambda: note.exists() and len(note.read_text().split()) == 2)
        child_pid, ignored = note.read_text().split()
        # The job's subprocess did not inherit ignored or blocked signals: the worker shields
        # itself from the daemon's signals, its commands do not.
        assert int(ignored, 16) & bits(*DAEMON_SIGNALS) == 0
        assert signal_mask(int(child_pid), "SigBlk") & bits(*DAEMON_SIGNALS) == 0
        with pytest.raises(JobTimeout):
            await run
        # ... and went down with the worker's process group.
        deadline = time.monotonic() + 3
        while (
            psutil.pid_exists(int(child_pid))
            and psutil.Process(int(child_pid)).status() != psutil.STATUS_ZOMBIE
        ):
            assert time.monotonic() < deadline, "the run's subprocess outlived its timeout"
            await asyncio.sleep(0.05)

    async def test_workers_die_with_a_killed_parent(self) -> None:
        script = textwrap.dedent(
            """
            import asyncio, time
            from taskd.run.pool import ProcessPool

            async def main():
                pool = ProcessPool(2)
                await pool.start()
                busy = [asyncio.ensure_future(pool.run(time.sleep, (60,))) for _ in range(2)]
                await asyncio.sleep(0.05)
                print(*pool.pids(), flush=True)
                await asyncio.sleep(60)

            asyncio.run(main())
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            pids = [int(p) for p in line.split()]
            assert len(pids) == 2
        finally:
            proc.kill()
        # stdout reaches end of file only once every process holding it (forkserver and
        # workers, busy in a 60 s sleep) is gone.
        await asyncio.wait_for(proc.communicate(), 5)
        await wait_until(lambda: all(gone(pid) for pid in pids))


class TestDaemonSignals:
    """The daemon's signals (SIGHUP, SIGINT, SIGTERM) sent to the forkserver or to a worker,
    as a group signal or ``systemctl kill`` does, cost no run; a dead forkserver is replaced."""

    @pytest.fixture(autouse=True)
    def _pool_started_forkserver(self) -> None:
        """multiprocessing's forkserver is one per process: one left by an earlier test that
        started it with a plain forkserver context (tests/plugins_bundled) lacks the blocked
        signals the pool gives its own. Retire it, so the pool starts the forkserver here, as
        in the daemon."""
        pid = forkserver.forkserver_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while not forkserver.forget_dead_forkserver() and time.monotonic() < deadline:
                time.sleep(0.01)

    async def test_sigterm_to_the_forkserver_and_workers_costs_no_run(
        self, make_pool: PoolFactory, tmp_path: Path
    ) -> None:
        pool = await make_pool(workers=2)
        files = [tmp_path / "a", tmp_path / "b"]
        runs = [start(pool.run(jobs.report_pid_and_sleep, (str(f), 1.0))) for f in files]
        pids = [await wait_for_pid(f) for f in files]
        forkserver = psutil.Process(pids[0]).ppid()
        assert forkserver != os.getpid()
        os.kill(forkserver, signal.SIGTERM)
        for pid in pids:
            for sig in DAEMON_SIGNALS:
                os.kill(pid, sig)
        assert await asyncio.gather(*runs) == pids
        assert not gone(forkserver)
        assert pool.restarts == {}
        # A worker started after the signals comes from the same, working forkserver.
        with pytest.raises(WorkerDied):
            await pool.run(jobs.exit_now, (1,))
        await wait_until(lambda: pool.size == 2)
        fresh = set(pool.pids()) - set(pids)
        assert len(fresh) == 1
        assert psutil.Process(fresh.pop()).ppid() == forkserver
        assert await asyncio.gather(*(pool.run(jobs.add, (i, 1)) for i in range(4))) == [1, 2, 3, 4]

    async def test_a_forked_child_of_a_job_still_dies_of_sigterm(
        self, make_pool: PoolFactory, tmp_path: Path
    ) -> None:
        pool = await make_pool(workers=1)
        pid_file = tmp_path / "child"
        run = start(pool.run(fork_and_wait, (str(pid_file), 30.0)))
        child = await wait_for_pid(pid_file)
        os.kill(child, signal.SIGTERM)
        assert await asyncio.wait_for(run, 10) == -signal.SIGTERM
        assert await pool.run(jobs.add, (1, 1)) == 2

    async def test_a_dead_forkserver_is_replaced(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=2)
        running = start(pool.run(jobs.sleep_then, (30, "never")))
        await asyncio.sleep(0)
        forkserver = psutil.Process(pool.pids()[0]).ppid()
        with capture_logs() as logs:
            os.kill(forkserver, signal.SIGKILL)
            # Reaped behind multiprocessing's back (a plugin's os.wait(), SIGCHLD ignored):
            # it cannot see the death itself and would fail every later start. Blocking the
            # loop on purpose (for the moment a SIGKILLed process takes to exit): the pool
            # must not start a worker, and multiprocessing reap it, before this does.
            os.waitpid(forkserver, 0)  # noqa: ASYNC222
            with pytest.raises(WorkerDied, match=f"forkserver process {forkserver}"):
                await running
            await wait_until(lambda: pool.size == 2)
        fresh = {psutil.Process(pid).ppid() for pid in pool.pids()}
        assert len(fresh) == 1 and forkserver not in fresh
        assert [e["dead"] for e in logs if e["event"] == "procpool.forkserver_replaced"] == [
            forkserver
        ]
        assert await asyncio.gather(*(pool.run(jobs.add, (i, 1)) for i in range(4))) == [1, 2, 3, 4]


class TestCrashLoops:
    """Workers that keep dying are replaced ever more slowly, the pool says it is degraded,
    and it recovers by itself."""

    async def test_a_job_that_crashes_every_run(
        self, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        starts = count_starts(monkeypatch)
        pool = await make_pool(workers=1)
        assert len(starts) == 1
        with capture_logs() as logs:
            crashes = [start(pool.run(jobs.segfault)) for _ in range(10)]
            await wait_until(lambda: sum(t.done() for t in crashes) >= 5, timeout=10)
            failed = [t for t in crashes if t.done()]
            for task in failed:
                with pytest.raises(WorkerDied, match="SIGSEGV"):
                    await task
            # One start per death, each after a longer wait: 0.1 s, 0.2, 0.4, 0.8 ...
            assert len(starts) == len(failed)
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            assert all(gap >= 0.09 * 2**i for i, gap in enumerate(gaps)), gaps
            assert pool.degraded is not None
            assert "SIGSEGV" in pool.degraded and "in a row" in pool.degraded
            for task in crashes:
                task.cancel()
            await asyncio.gather(*crashes, return_exceptions=True)
            # A healthy run: it waits out the back-off, completes, and the pool has recovered.
            assert await pool.run(jobs.add, (1, 2)) == 3
            assert pool.degraded is None
        events = [e["event"] for e in logs if e["event"].startswith("procpool.")]
        assert events.count("procpool.degraded") == 1
        assert events[-1] == "procpool.recovered"
        assert [e["respawn_in"] for e in logs if e["event"] == "procpool.worker_died"][:4] == [
            0.1,
            0.2,
            0.4,
            0.8,
        ]

    async def test_workers_killed_on_every_start(
        self, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(records, "STABLE_AFTER", 1.0)
        pool = await make_pool(workers=1)
        killed: list[tuple[int, float]] = []
        with capture_logs() as logs:
            for _ in range(4):
                await wait_until(lambda: pool.size == 1 and pool.pids()[0] not in dict(killed))
                pid = pool.pids()[0]
                if killed:
                    # The replacement came no sooner than the back-off allows.
                    assert time.monotonic() - killed[-1][1] >= 0.09 * 2 ** (len(killed) - 1)
                killed.append((pid, time.monotonic()))
                os.kill(pid, signal.SIGKILL)
                await wait_until(lambda pid=pid: pid not in pool.pids())
            assert pool.degraded is not None and "SIGKILL" in pool.degraded
            # Nobody kills the next one: once it has been up a while, the pool is healthy
            # again, without any run to prove it.
            await wait_until(lambda: pool.degraded is None, timeout=5)
        assert [
            e["event"] for e in logs if e["event"] in {"procpool.degraded", "procpool.recovered"}
        ] == [
            "procpool.degraded",
            "procpool.recovered",
        ]
        assert pool.restarts == {"died": 4}
        assert await pool.run(jobs.add, (1, 2)) == 3


class TestTimeout:
    """A run past its timeout has its worker killed; time spent queued does not count."""

    async def test_kills_the_worker(self, make_pool: PoolFactory, tmp_path: Path) -> None:
        pool = await make_pool(workers=2)
        pid_file = tmp_path / "pid"
        with pytest.raises(JobTimeout, match=r"timed out after 0\.3s"):
            await pool.run(jobs.report_pid_and_sleep, (str(pid_file), 30), timeout=0.3)
        pid = read_pid(pid_file)
        assert gone(pid)  # reaped before run() raised, not just signalled
        assert pool.restarts == {"timeout": 1}
        assert await pool.run(jobs.add, (2, 2), timeout=5) == 4
        await wait_until(lambda: pool.size == 2)
        assert pid not in pool.pids()

    async def test_queued_time_does_not_count(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1)
        first = start(pool.run(jobs.sleep_then, (0.4, "first")))
        second = start(pool.run(jobs.sleep_then, (0.0, "second"), timeout=0.2))
        assert list(await asyncio.gather(first, second)) == ["first", "second"]


class TestCancellation:
    """Cancelling the caller drops a queued run and kills an executing one's worker."""

    async def test_executing_run_kills_its_worker(
        self, make_pool: PoolFactory, tmp_path: Path
    ) -> None:
        pool = await make_pool(workers=2)
        pid_file = tmp_path / "pid"
        task = start(pool.run(jobs.report_pid_and_sleep, (str(pid_file), 30)))
        pid = await wait_for_pid(pid_file)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: gone(pid))
        await wait_until(lambda: pool.size == 2)
        assert pid not in pool.pids()
        assert pool.busy == 0
        assert await pool.run(jobs.add, (1, 1)) == 2
        assert pool.restarts == {"killed": 1}  # on purpose: not counted as died

    async def test_queued_run_is_dropped(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1)
        pids = pool.pids()
        running = start(pool.run(jobs.sleep_then, (0.2, "ran")))
        waiting = start(pool.run(jobs.add, (1, 1)))
        await asyncio.sleep(0)
        assert pool.queued == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.queued == 0
        assert await running == "ran"
        assert pool.pids() == pids


class TestMemoryLimit:
    """max_memory: the kernel refuses allocations past it (RLIMIT_DATA, for that run only);
    the RSS watch kills a worker that grows past it in memory the limit does not count."""

    async def test_an_allocation_past_the_limit_fails_the_run(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1, memory_check_interval=0.05)
        pids = pool.pids()
        with pytest.raises(MemoryLimitExceeded) as info:
            await pool.run(jobs.allocate_and_sleep, (200 * MiB, 30), max_memory=100 * MiB)
        assert f"max_memory={100 * MiB} bytes (100.0 MiB)" in str(info.value)
        assert "RLIMIT_DATA" in str(info.value) and "MemoryError" in str(info.value)
        # Replaced: what the job left in its memory is in doubt.
        await wait_until(lambda: gone(pids[0]))
        await wait_until(lambda: pool.size == 1)
        assert pool.restarts == {"memory": 1}
        assert await pool.run(jobs.allocate_and_sleep, (MiB, 0.1), max_memory=500 * MiB) == MiB

    async def test_the_limit_holds_for_its_run_only(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1)
        before = await pool.run(jobs.data_limit)
        assert await pool.run(jobs.data_limit, max_memory=100 * MiB) == (100 * MiB, before[1])
        # The same worker, after a limited run: its old soft limit is back, and a run
        # without max_memory may use more than the last run's limit.
        assert await pool.run(jobs.data_limit) == before
        assert await pool.run(jobs.allocate_and_sleep, (200 * MiB, 0)) == 200 * MiB
        assert pool.restarts == {}

    async def test_rss_the_limit_does_not_count_is_watched(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1, memory_check_interval=0.05)
        pids = pool.pids()
        with pytest.raises(MemoryLimitExceeded) as info:
            await pool.run(jobs.map_shared_and_sleep, (200 * MiB, 30), max_memory=100 * MiB)
        assert f"over max_memory={100 * MiB} bytes" in str(info.value)
        assert gone(pids[0])
        await wait_until(lambda: pool.size == 1)


class TestClose:
    """close() lets running runs finish up to its timeout, then kills the rest."""

    async def test_waits_for_running_and_queued_runs(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=1)
        pids = pool.pids()
        running = start(pool.run(jobs.sleep_then, (0.2, "a")))
        queued = start(pool.run(jobs.sleep_then, (0.0, "b")))
        await asyncio.sleep(0)
        await pool.close(timeout=5)
        assert list(await asyncio.gather(running, queued)) == ["a", "b"]
        assert pool.pids() == []
        assert gone(pids[0])
        with pytest.raises(JobError, match="closed"):
            await pool.run(jobs.add, (1, 1))

    async def test_kills_what_is_left_after_timeout(
        self, make_pool: PoolFactory, tmp_path: Path
    ) -> None:
        pool = await make_pool(workers=2)
        pid_file = tmp_path / "pid"
        stuck = start(pool.run(jobs.report_pid_and_sleep, (str(pid_file), 30)))
        pid = await wait_for_pid(pid_file)
        t0 = time.monotonic()
        await pool.close(timeout=0.2)
        assert time.monotonic() - t0 < 5
        with pytest.raises(WorkerDied, match="close"):
            await stuck
        assert gone(pid)
        await pool.close()  # idempotent


class TestKill:
    """kill() stops every worker at once; pending runs fail with WorkerDied."""

    async def test_fails_executing_and_queued_runs(self, make_pool: PoolFactory) -> None:
        pool = await make_pool(workers=2)
        pids = pool.pids()
        tasks = [start(pool.run(jobs.sleep_then, (30, i))) for i in range(3)]
        await asyncio.sleep(0)
        pool.kill()
        for task in tasks:
            with pytest.raises(WorkerDied):
                await task
        await pool.close()
        assert all(gone(pid) for pid in pids)


class TestStartFailures:
    """Workers that die at start-up are retried with back-off, then runs fail clearly."""

    async def test_start_raises_when_no_worker_can_start(self) -> None:
        class Broken(ProcessPool):
            worker_main = staticmethod(jobs.broken_worker_main)

        pool = Broken(1)
        t0 = time.monotonic()
        with capture_logs() as logs, pytest.raises(JobError, match="cannot start worker"):
            await pool.start()
        assert time.monotonic() - t0 < 5
        assert [e["attempt"] for e in logs if e["event"] == "procpool.worker_start_failed"] == [
            1,
            2,
            3,
        ]
        assert pool.pids() == []

    async def test_queued_runs_fail_then_pool_recovers(self, make_pool: PoolFactory) -> None:
        class Flaky(ProcessPool):
            worker_main = staticmethod(jobs.flaky_worker_main)

        pool = Flaky(2)
        await pool.start()
        marker = jobs.broken_marker()
        try:
            with capture_logs():
                marker.touch()
                deaths = [start(pool.run(jobs.exit_now, (1,))) for _ in range(2)]
                for task in deaths:
                    with pytest.raises(WorkerDied):
                        await task
                with pytest.raises(JobError, match="cannot start worker processes"):
                    await pool.run(jobs.add, (1, 2))  # queued, then failed
                with pytest.raises(JobError, match="cannot start worker processes"):
                    await pool.run(jobs.add, (1, 2))  # refused at once
                marker.unlink()
                await wait_until(lambda: pool.size == 2)
            assert await pool.run(jobs.add, (1, 2)) == 3
        finally:
            marker.unlink(missing_ok=True)
            pool.kill()
            await pool.close()


async def _scenario() -> None:
    async with ProcessPool(2) as pool:
        assert await pool.run(jobs.add, (1, 2)) == 3
        with pytest.raises(ValueError, match="x"):
            await pool.run(jobs.raise_value_error, ("x",))
        dying = asyncio.ensure_future(pool.run(jobs.exit_now, (5,)))
        other = asyncio.ensure_future(pool.run(jobs.sleep_then, (0.1, "ok")))
        with pytest.raises(WorkerDied):
            await dying
        assert await other == "ok"
        with pytest.raises(JobTimeout):
            await pool.run(jobs.sleep_then, (30,), timeout=0.1)
        await wait_until(lambda: pool.size == 2)
        assert await asyncio.gather(*(pool.run(jobs.add, (i, 0)) for i in range(50))) == list(
            range(50)
        )


class TestEventLoops:
    """The pool works on both the stdlib loop and uvloop."""

    @pytest.mark.parametrize(
        "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
    )
    def test_round_trip_death_and_timeout(
        self, loop_factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_scenario())
