"""The batch of log lines (taskd.log_output.Output): lines logged on the main thread's loop
wait for one write early in the next iteration; lines from elsewhere are written at once with
the batch ahead of them; failures drop and count each line; exit, fork and
flush_std_streams() write what waits."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from taskd import log_output
from taskd.log_output import BATCH_LIMIT, Output


class _Counting(io.StringIO):
    """A stream without an fd that records each write it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.fail: int | None = None

    def write(self, text: str) -> int:
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def ascii_file(tmp_path: Path) -> Iterator[tuple[TextIO, Path]]:
    """A real file (it has an fd) that takes ASCII only, and its path."""
    path = tmp_path / "out"
    with open(path, "w", encoding="ascii", errors="strict") as stream:
        yield stream, path


def _pipe_output() -> tuple[Output, int, TextIO]:
    """An Output over the write end of a pipe, as stdout on a pipe; and the read end."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    stream = open(w, "w")  # noqa: SIM115 (closed by the test)
    return Output(stream), r, stream


def _read_all(fd: int) -> list[bytes]:
    """Each read(2)'s bytes; a pipe keeps no write boundaries, so this is for content only."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return chunks
        if not chunk:
            return chunks
        chunks.append(chunk)


class TestOnTheLoop:
    """On the main thread's running loop, lines wait for one write in the next iteration."""

    async def test_one_write_for_an_iterations_lines(self) -> None:
        stream = _Counting()
        out = Output(stream)
        for n in range(100):
            out.put(f'{{"n": {n}}}')
        assert stream.writes == []  # still this iteration
        await asyncio.sleep(0)
        assert len(stream.writes) == 1
        assert stream.writes[0] == "".join(f'{{"n": {n}}}\n' for n in range(100))

    async def test_each_iteration_its_own_write(self) -> None:
        stream = _Counting()
        out = Output(stream)
        for it in range(3):
            out.put(f"a{it}")
            out.put(f"b{it}")
            await asyncio.sleep(0)
        assert stream.writes == ["a0\nb0\n", "a1\nb1\n", "a2\nb2\n"]

    async def test_nothing_waits_while_the_loop_sleeps(self) -> None:
        stream = _Counting()
        out = Output(stream)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def later() -> None:
            out.put("from a timer")
            done.set_result(None)

        loop.call_later(0.01, later)
        await done
        await asyncio.sleep(0.05)  # the loop sleeps in its poll: the line is out before
        assert stream.writes == ["from a timer\n"]

    async def test_written_at_the_limit_without_waiting(self) -> None:
        stream = _Counting()
        out = Output(stream)
        line = "x" * 1000
        count = BATCH_LIMIT // len(line) + 10
        for _ in range(count):
            out.put(line)
        assert len(stream.writes) == 1 and len(stream.writes[0]) >= BATCH_LIMIT
        await asyncio.sleep(0)
        assert len(stream.writes) == 2
        assert stream.getvalue() == (line + "\n") * count

    async def test_fd_stream_gets_one_write_syscall(self, monkeypatch: pytest.MonkeyPatch) -> None:
        out, r, stream = _pipe_output()
        calls: list[int] = []
        real = os.write

        def counting(fd: int, data: bytes) -> int:
            calls.append(len(data))
            return real(fd, data)

        monkeypatch.setattr(os, "write", counting)
        for n in range(500):
            out.put(f'{{"event": "run", "n": {n}, "who": "\\u00e9"}}')
        await asyncio.sleep(0)
        assert len(calls) == 1
        text = b"".join(_read_all(r)).decode()
        assert text.splitlines() == [
            f'{{"event": "run", "n": {n}, "who": "\\u00e9"}}' for n in range(500)
        ]
        os.close(r)
        stream.close()

    async def test_a_write_cut_short_is_completed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # A signal while the reader was slow: write(2) returns part of the batch.
        out, r, stream = _pipe_output()
        real = os.write

        def short(fd: int, data: bytes) -> int:
            return real(fd, data[:7])

        monkeypatch.setattr(os, "write", short)
        before = log_output.dropped_lines()
        for n in range(20):
            out.put(f"line {n}")
        await asyncio.sleep(0)
        text = b"".join(_read_all(r)).decode()
        assert text == "".join(f"line {n}\n" for n in range(20))
        assert log_output.dropped_lines() == before
        os.close(r)
        stream.close()

    async def test_a_print_before_the_batch_stays_before(self) -> None:
        out, r, stream = _pipe_output()
        print("printed first", file=stream)
        out.put("logged after")
        await asyncio.sleep(0)
        assert b"".join(_read_all(r)) == b"printed first\nlogged after\n"
        os.close(r)
        stream.close()


class TestElsewhere:
    """Off the loop, or on another thread, a line is written at once, the batch first."""

    def test_no_loop_writes_at_once(self) -> None:
        stream = _Counting()
        out = Output(stream)
        out.put("one")
        out.put("two")
        assert stream.writes == ["one\n", "two\n"]

    async def test_a_thread_writes_the_batch_ahead_of_its_line(self) -> None:
        stream = _Counting()
        out = Output(stream)
        out.put("loop 1")
        out.put("loop 2")
        thread = threading.Thread(target=out.put, args=("thread",))
        thread.start()
        thread.join()
        assert stream.writes == ["loop 1\nloop 2\nthread\n"]
        await asyncio.sleep(0)
        assert stream.writes == ["loop 1\nloop 2\nthread\n"]  # nothing written twice

    def test_a_loop_in_another_thread_does_not_batch(self) -> None:
        stream = _Counting()
        out = Output(stream)

        async def in_thread() -> list[str]:
            out.put("from a plugin's own loop")
            return list(stream.writes)

        seen: list[list[str]] = []
        thread = threading.Thread(target=lambda: seen.append(asyncio.run(in_thread())))
        thread.start()
        thread.join()
        assert seen == [["from a plugin's own loop\n"]]

    async def test_threads_and_loop_never_interleave(self) -> None:
        stream = _Counting()
        out = Output(stream)

        def worker(name: str) -> None:
            for n in range(200):
                out.put(f"{name} {n} " + "p" * 500)

        threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for n in range(200):
            out.put(f"loop {n} " + "p" * 500)
            if n % 20 == 0:
                await asyncio.sleep(0)
        for t in threads:
            t.join()
        await asyncio.sleep(0)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1000
        for name in ("loop", "t0", "t1", "t2", "t3"):
            mine = [line.split()[1] for line in lines if line.startswith(name + " ")]
            assert mine == [str(n) for n in range(200)]
        assert all(line.endswith(" " + "p" * 500) for line in lines)


class TestFailures:
    """A batch the stream cannot take is dropped line by line in the count."""

    async def test_full_disk_counts_each_line_and_tries_again(self) -> None:
        stream = _Counting()
        out = Output(stream)
        before = log_output.dropped_lines()
        stream.fail = errno.ENOSPC
        for n in range(5):
            out.put(f"lost {n}")
        await asyncio.sleep(0)
        assert log_output.dropped_lines() == before + 5 and not out.gone
        stream.fail = None
        out.put("kept")
        await asyncio.sleep(0)
        assert stream.getvalue() == "kept\n"

    async def test_a_non_blocking_pipe_waits_for_its_reader(self) -> None:
        # Someone set O_NONBLOCK on the pipe we share: a batch larger than the pipe's buffer
        # gets EAGAIN part-way and must wait for the reader, not drop the rest.
        out, r, stream = _pipe_output()
        os.set_blocking(stream.fileno(), False)
        os.set_blocking(r, True)
        received: list[bytes] = []

        def slow_reader() -> None:
            while chunk := os.read(r, 4096):
                received.append(chunk)

        reader = threading.Thread(target=slow_reader)
        reader.start()
        before = log_output.dropped_lines()
        lines = [f"line {n:06d} " + "x" * 100 for n in range(3000)]  # ~330 KB, > 64 KiB pipe
        for line in lines:
            out.put(line)
        await asyncio.sleep(0)
        out.write_pending()
        stream.close()
        reader.join(10)
        assert b"".join(received).decode().splitlines() == lines
        assert log_output.dropped_lines() == before and not out.gone
        os.close(r)

    async def test_a_non_blocking_pipe_nobody_reads_drops_after_a_wait(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(log_output, "BLOCKED_WAIT", 0.2)
        out, r, stream = _pipe_output()
        os.set_blocking(stream.fileno(), False)
        before = log_output.dropped_lines()
        lines = [f"line {n:06d} " + "x" * 100 for n in range(3000)]
        for line in lines:
            out.put(line)
        await asyncio.sleep(0)
        out.write_pending()
        got = b"".join(_read_all(r)).decode()
        written = got.count("\n")
        assert 0 < written < len(lines) and got.splitlines()[:written] == lines[:written]
        # Each line that did not go out is counted, including the one cut in half.
        assert log_output.dropped_lines() - before == len(lines) - written
        assert not out.gone  # a reader may come back: later lines are tried again
        out.put("after")
        await asyncio.sleep(0)
        assert b"".join(_read_all(r)).endswith(b"\nafter\n")
        os.close(r)
        stream.close()

    async def test_gone_reader_counts_without_writing(self) -> None:
        out, r, stream = _pipe_output()
        os.close(r)
        before = log_output.dropped_lines()
        for n in range(3):
            out.put(f"lost {n}")
        await asyncio.sleep(0)
        assert out.gone and log_output.dropped_lines() == before + 3
        out.put("after")
        assert log_output.dropped_lines() == before + 4
        stream.close()

    async def test_part_written_counts_only_the_rest(self, monkeypatch: pytest.MonkeyPatch) -> None:
        out, r, stream = _pipe_output()
        real = os.write
        calls = [0]

        def then_full(fd: int, data: bytes) -> int:
            calls[0] += 1
            if calls[0] > 1:
                raise OSError(errno.ENOSPC, "full")
            return real(fd, data[: len(b"line 0\nline 1\nli")])

        monkeypatch.setattr(os, "write", then_full)
        before = log_output.dropped_lines()
        for n in range(5):
            out.put(f"line {n}")
        await asyncio.sleep(0)
        assert log_output.dropped_lines() == before + 3  # lines 2-4; 0 and 1 went out
        monkeypatch.setattr(os, "write", real)
        out.put("next")
        await asyncio.sleep(0)
        # The fragment of line 2 is ended before the next line, which stays whole.
        assert b"".join(_read_all(r)) == b"line 0\nline 1\nli\nnext\n"
        os.close(r)
        stream.close()

    async def test_an_unencodable_line_costs_that_line_only(self) -> None:
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict", write_through=True)
        out = Output(stream)
        before = log_output.dropped_lines()
        out.put("first")
        out.put("caf\udce9")
        out.put("last")
        await asyncio.sleep(0)
        assert log_output.dropped_lines() == before + 1
        assert raw.getvalue() == b"first\nlast\n"

    async def test_unencodable_on_an_fd(self, ascii_file: tuple[TextIO, Path]) -> None:
        stream, path = ascii_file
        out = Output(stream)
        before = log_output.dropped_lines()
        for line in ("first", "caf\udce9", "last"):
            out.put(line)
        await asyncio.sleep(0)
        assert log_output.dropped_lines() == before + 1
        assert path.read_text() == "first\nlast\n"


class TestFlushes:
    """What waits is written by flush_std_streams(), at exit and before a fork."""

    async def test_flush_std_streams_writes_the_batch(self) -> None:
        stream = _Counting()
        out = Output(stream)
        out.put("waiting")
        log_output.flush_std_streams()
        assert stream.writes == ["waiting\n"]

    def test_at_exit(self, tmp_path: Path) -> None:
        # The loop stops in the iteration that logged: its callback never runs.
        code = textwrap.dedent(
            """
            import asyncio, sys
            from taskd.log_output import Output
            out = Output(sys.stdout)
            loop = asyncio.new_event_loop()
            def last():
                out.put("the last line")
                loop.stop()
            loop.call_soon(last)
            loop.run_forever()
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "the last line\n"

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    async def test_fork_writes_first_and_the_child_does_not_repeat(
        self, ascii_file: tuple[TextIO, Path]
    ) -> None:
        stream, path = ascii_file
        out = Output(stream)
        out.put("before the fork")
        pid = os.fork()
        if pid == 0:  # the child: whatever it writes comes after, and once
            try:
                out.put("from the child")
                log_output.write_all_pending()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)  # noqa: ASYNC222 (the child exits at once)
        assert os.waitstatus_to_exitcode(status) == 0
        await asyncio.sleep(0)
        assert path.read_text() == "before the fork\nfrom the child\n"


class TestReentry:
    """A line logged in the middle of a write on the same thread (a finaliser that logs,
    such as asyncio's "Task was destroyed") waits for that write, and nothing hangs."""

    def test_a_line_logged_during_a_write(self) -> None:
        class Reentering(_Counting):
            out: Output

            def write(self, text: str) -> int:
                if not self.writes:
                    self.writes.append("(inner next)")
                    self.out.put("from a finaliser")
                return super().write(text)

        stream = Reentering()
        out = stream.out = Output(stream)
        thread = threading.Thread(target=out.put, args=("first",), daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the log hung on its own lock"
        assert stream.getvalue() == "first\nfrom a finaliser\n"
