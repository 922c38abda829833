"""Bundled taskd plugin: ``command``, run a shell command or an argv as an asyncio subprocess.

A drop-in file: the daemon loads it by path. The job is ``kind="io"``: waiting on a child
process costs the event loop nothing, so it needs no thread.

The child is started in a session (and so a process group) of its own. When the run is
cancelled (the job's timeout, or the daemon stopping) the whole group gets SIGTERM, then after
``kill_grace`` seconds SIGKILL: a shell's own children are killed too, not orphaned.
"""

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import taskd

_READ_SIZE = 64 * 1024
# After SIGKILL, how long to wait for the pipes to close before giving up on them.
_REAP_TIMEOUT = 5.0
# The stderr tail quoted in a failure's message; the result keeps up to max_output.
_MESSAGE_TAIL = 2000


class CommandFailed(RuntimeError):
    """The command exited with a code not in ``ok_codes``; carries what it wrote."""

    def __init__(self, message: str, exit_code: int, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce passes only the message to __init__; keep it re-creatable.
        return (type(self), (str(self), self.exit_code, self.stdout, self.stderr))


class _Tail:
    """The last ``limit`` bytes of a stream, and how many bytes it carried in all."""

    __slots__ = ("buf", "limit", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        # Read until EOF whatever the limit: a child blocked on a full pipe would never exit.
        while chunk := await stream.read(_READ_SIZE):
            self.total += len(chunk)
            self.buf += chunk
            if len(self.buf) > self.limit:
                del self.buf[: len(self.buf) - self.limit]

    def text(self) -> str:
        data = bytes(self.buf)
        if self.total > len(data):
            # Cut mid-character: drop UTF-8 continuation bytes rather than show a U+FFFD.
            data = data.lstrip(bytes(range(0x80, 0xC0)))
        return data.decode("utf-8", errors="replace")


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a process group; False if none of it is left (that is not an error)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def _stop(
    proc: asyncio.subprocess.Process, readers: list[asyncio.Task[None]], grace: float
) -> None:
    """SIGTERM the child's process group, give it ``grace`` seconds, SIGKILL the group, reap.

    The group's id is the child's pid (start_new_session made it the leader). The group can
    outlive the leader: the shell may be gone while its background jobs run on, so the group is
    signalled even when ``proc`` has exited.
    """
    pgid = proc.pid
    # proc.wait() returns once the leader exited and (asyncio <= 3.11) both pipes reached EOF.
    waiter = asyncio.ensure_future(proc.wait())
    try:
        if _signal_group(pgid, signal.SIGTERM):
            # Done early once the leader exited and the pipes reached EOF: every process that
            # inherited them has exited. Processes cannot be waited for by group, and zombies
            # keep answering killpg where PID 1 does not reap, so polling the group won't do.
            await asyncio.wait([waiter, *readers], timeout=grace)
    finally:
        # Always, even if cancelled again during the grace period: whatever ignored SIGTERM
        # (or is still cleaning up) goes now.
        _signal_group(pgid, signal.SIGKILL)
    held = True
    try:
        # Bounded: a process that left the group (setsid, a daemonising service) may hold the
        # pipes for ever, and the daemon's stop must not wait on it.
        await asyncio.wait([waiter, *readers], timeout=_REAP_TIMEOUT)
        held = not (waiter.done() and all(r.done() for r in readers))
    finally:
        if held:
            # Close our ends of the pipes: else the transport stays open (and warns when
            # collected) as long as the escaped process lives. Private, hence the getattr.
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
        for task in (waiter, *readers):
            task.cancel()
        for task in (waiter, *readers):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _spawn(
    cmd: str | None, argv: list[str] | None, options: dict[str, Any]
) -> asyncio.subprocess.Process:
    if argv is not None:
        return await asyncio.create_subprocess_exec(*argv, **options)
    assert cmd is not None  # checked by the caller: exactly one of them
    return await asyncio.create_subprocess_shell(cmd, **options)


async def _finish_spawn(
    spawning: asyncio.Future[asyncio.subprocess.Process],
) -> asyncio.subprocess.Process | None:
    try:
        return await spawning
    except Exception:
        return None  # it failed: nothing runs


def _read_both(
    proc: asyncio.subprocess.Process, out: _Tail, err: _Tail
) -> list[asyncio.Task[None]]:
    """Start reading stdout and stderr at once: reading one to EOF first deadlocks once the
    child fills the other pipe's buffer (64 KiB on Linux) and blocks writing to it."""
    # Both are pipes, as the caller asked for; the asserts only tell the type checker.
    assert proc.stdout is not None
    assert proc.stderr is not None
    return [
        asyncio.create_task(out.drain(proc.stdout)),
        asyncio.create_task(err.drain(proc.stderr)),
    ]


def _label(cmd: str | None, argv: list[str] | None) -> str:
    return cmd if cmd is not None else " ".join(argv or [])


async def command(
    ctx: taskd.JobContext,
    cmd: str | None = None,
    argv: list[str] | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    ok_codes: list[int] = [0],  # noqa: B006 - never mutated; a literal default documents itself
    max_output: int = 64 * 1024,
    kill_grace: float = 5.0,
) -> dict[str, Any]:
    """Run a shell command or an argv; fail on an exit code not in ok_codes.

    Options (exactly one of cmd and argv):
      cmd: a command line for /bin/sh -c.
      argv: a program and its arguments, run without a shell.
      cwd: the working directory (default: the daemon's).
      env: variables added to the daemon's environment.
      ok_codes: exit codes that count as success (default [0]).
      max_output: bytes kept from the end of stdout and of stderr each (default 65536); the
        rest is read and dropped.
      kill_grace: seconds between SIGTERM and SIGKILL to the process group when the run is
        cancelled or times out (default 5).

    Returns exit_code, stdout, stderr (their tails), stdout_bytes, stderr_bytes, seconds.
    """
    if (cmd is None) == (argv is None):
        raise ValueError("command: give exactly one of option 'cmd' and option 'argv'")
    if argv is not None and not argv:
        raise ValueError("command: option 'argv' must name a program, got an empty list")
    if max_output < 0:
        raise ValueError(f"command: option 'max_output' must be >= 0, got {max_output}")
    if kill_grace < 0:
        raise ValueError(f"command: option 'kill_grace' must be >= 0, got {kill_grace}")

    label = _label(cmd, argv)
    options: dict[str, Any] = {
        "stdin": asyncio.subprocess.DEVNULL,  # never the daemon's stdin
        "stdout": asyncio.subprocess.PIPE,
        "stderr": asyncio.subprocess.PIPE,
        "cwd": cwd,
        "env": {**os.environ, **env} if env else None,
        "start_new_session": True,  # own process group, so the group can be killed as one
    }
    start = time.monotonic()
    out, err = _Tail(max_output), _Tail(max_output)
    # Shielded: cancelled while asyncio still connects the pipes, asyncio would kill the child
    # alone and leave anything it started (a shell's background jobs) running. Instead the
    # spawn is let finish, a few loop iterations, and the group stopped as at any other time.
    spawning = asyncio.ensure_future(_spawn(cmd, argv, options))
    try:
        proc = await asyncio.shield(spawning)
    except asyncio.CancelledError:
        spawned = await _finish_spawn(spawning)
        if spawned is not None:
            ctx.log.debug("command stopping", command=label, pid=spawned.pid, grace=kill_grace)
            await _stop(spawned, _read_both(spawned, out, err), kill_grace)
        raise
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # Which of the two was missing: asyncio's loop names it in exc.filename, uvloop does
        # not, so look. In the thread pool: a stat can hang on a dead network mount.
        bad_cwd = cwd is not None and not await ctx.to_thread(os.path.isdir, cwd)
        what = f"option 'cwd' {cwd!r}" if bad_cwd else "program"
        raise type(exc)(f"command: cannot run {label!r}: {what}: {exc.strerror}") from exc
    ctx.log.debug("command started", command=label, pid=proc.pid)

    readers = _read_both(proc, out, err)
    finished = False
    try:
        exit_code = await proc.wait()
        # asyncio.wait, not gather: a cancelled gather cancels the readers, and _stop needs
        # them running to see the pipes close.
        await asyncio.wait(readers)
        for reader in readers:
            reader.result()  # re-raise a reader's error, if any
        finished = True
    finally:
        if not finished:
            ctx.log.debug("command stopping", command=label, pid=proc.pid, grace=kill_grace)
            await _stop(proc, readers, kill_grace)

    seconds = round(time.monotonic() - start, 3)
    result: dict[str, Any] = {
        "exit_code": exit_code,
        "stdout": out.text(),
        "stderr": err.text(),
        "stdout_bytes": out.total,
        "stderr_bytes": err.total,
        "seconds": seconds,
    }
    ctx.log.debug("command finished", command=label, exit_code=exit_code, seconds=seconds)
    if exit_code not in ok_codes:
        how = f"exited with code {exit_code}"
        if exit_code < 0:  # asyncio's way of saying "killed by signal -exit_code"
            with contextlib.suppress(ValueError):  # a number with no name in signal.Signals
                how = f"was killed by {signal.Signals(-exit_code).name}"
        tail = result["stderr"][-_MESSAGE_TAIL:].rstrip() or "(no stderr)"
        raise CommandFailed(
            f"command {label!r} {how} (ok_codes: {ok_codes}); stderr tail:\n{tail}",
            exit_code,
            result["stdout"],
            result["stderr"],
        )
    return result


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [taskd.JobType("command", command, kind="io")]
