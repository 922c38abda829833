"""The daemon's side of the local cluster's helper process (taskd.run.executor.dask_local):
start it, read its address, pass its output to the log, and end it with every process of
its session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import deque

import psutil
import structlog

from taskd.errors import JobError

log = structlog.get_logger("taskd.dask")

START_TIMEOUT = 120.0  # a LocalCluster of a few workers starts in seconds; a busy host is slow


class DaskUnavailable(JobError):
    """The dask cluster cannot be reached, or could not be started: the run fails, the
    daemon goes on, and the next run tries again."""


class LocalHelper:
    """One running helper process: ``address`` is its scheduler's."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.address = address
        self._tail: deque[str] = deque(maxlen=20)
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, workers: int, timeout: float = START_TIMEOUT) -> LocalHelper:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskd.run.executor.dask_local",
            "--workers",
            str(workers),
            "--parent",
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            address = str(json.loads(line)["address"]) if line else ""
        except (TimeoutError, ValueError, KeyError, TypeError) as exc:
            address, why = "", f"{type(exc).__name__}: {exc}"
        except BaseException:  # cancelled: nobody would ever end the cluster it starts
            end_session(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        else:
            why = f"it exited with status {await _exit_status(proc)}" if not address else ""
        if not address:
            err = b""
            with contextlib.suppress(TimeoutError):
                err = await asyncio.wait_for(proc.stderr.read(4096), 1.0)
            end_session(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            detail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise DaskUnavailable(
                f"the local dask cluster did not start ({why})"
                + (f": {' | '.join(detail)}" if detail else "")
            )
        helper = cls(proc, address)
        helper._reader = asyncio.ensure_future(helper._read_stderr())
        log.info("dask_local_started", address=address, pid=proc.pid, workers=workers)
        return helper

    async def _read_stderr(self) -> None:
        """The cluster's own log lines (warnings and worse, see dask_local) into taskd's."""
        stream = self.proc.stderr
        assert stream is not None
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self._tail.append(text)
                log.info("dask_local_output", line=text[:2000])

    def session(self) -> list[psutil.Process]:
        return session_processes(self.pid)

    async def close(self, timeout: float) -> None:
        """Close its stdin (the lifeline), give it ``timeout`` seconds to close the cluster,
        then kill whatever of its session is left, and reap it."""
        proc = self.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("dask_local_slow_to_stop", pid=self.pid, timeout=timeout)
        end_session(self.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._reader, 1.0)


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes of session ``sid`` (the helper and the cluster it started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def end_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid``."""
    for proc in session_processes(sid):
        if proc.pid != sid:  # the helper itself is the caller's child to kill and reap
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                proc.send_signal(signal.SIGKILL)


async def _exit_status(proc: asyncio.subprocess.Process) -> int | None:
    try:
        return await asyncio.wait_for(proc.wait(), 5.0)
    except TimeoutError:
        return None
