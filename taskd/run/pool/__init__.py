"""The process pool that runs ``kind="cpu"`` jobs, with control over each worker.

Why not :class:`concurrent.futures.ProcessPoolExecutor`: when one of its workers dies every
pending future fails with ``BrokenProcessPool`` and the whole pool must be rebuilt, and one
worker cannot be killed (for a timeout, a memory limit, a cancelled run) without breaking all
the others. Here each worker is its own process with its own socket pair, so one can be killed
and replaced while the others keep going.

How it works:

* Workers come from a ``multiprocessing`` "forkserver" (safe to use from a threaded parent
  with a running loop; a replacement is a cheap fork of a small process that has already
  imported :mod:`taskd.run.worker`). Starting one is a blocking call into the forkserver, so
  it happens in a private thread; the per-run path never leaves the loop thread.
* Each worker runs one run at a time; runs wait in a FIFO queue when all are busy. The loop
  side of each socket pair is an asyncio transport with a small protocol that splits the
  stream into length-prefixed frames (see :mod:`taskd.run.worker` for the format), so a partial
  message never blocks the loop and a reply is handled in the callback that reads it.
* A worker's death is seen through its ``multiprocessing`` sentinel, watched with
  ``loop.add_reader``: for a forkserver child it turns readable once the forkserver has reaped
  the process and written its exit status, so "the process is gone" is a fact, not a guess.
  That fails only the run the worker was executing, and the worker's supervisor task starts a
  replacement.
* Crash loops are bounded: a slot whose workers keep ending without the pool asking (failed
  starts, crashes, kills from outside) waits longer before each replacement, and the pool
  reports itself :attr:`~ProcessPool.degraded` until a worker of that slot is healthy again.
* Timeouts, cancellation and memory limits SIGKILL the one worker; the run's outcome is
  decided when the signal is sent and delivered once the process is reaped.
* The daemon's signals (SIGHUP, SIGINT, SIGTERM) are the daemon's: sent to its process group
  (``kill -TERM -- -PID``, a terminal, ``systemctl kill``) or to a pool process directly, they
  kill neither the forkserver nor a worker, so a stop drains runs and a reload keeps them. A
  forkserver that dies anyway (SIGKILL) takes its workers with it (their parent-death signal)
  and is replaced at the next start.

Modules: :mod:`~taskd.run.pool.pool` (the runs: queue, dispatch, replies, timeouts, memory
limits), :mod:`~taskd.run.pool.supervisor` (the worker processes: start, back-off, kill,
exit), :mod:`~taskd.run.pool.records` (per-run, per-worker and per-slot bookkeeping),
:mod:`~taskd.run.pool.channel` (framing and encoding), :mod:`~taskd.run.pool.forkserver`
(the forkserver, shielded from the daemon's signals and replaced when dead); the code that
runs inside a worker is :mod:`taskd.run.worker`.
"""

from taskd.run.pool.pool import ProcessPool

__all__ = ["ProcessPool"]
