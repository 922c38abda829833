"""Results and errors measured within bounds, against the real daemon.

Pickle stores a shared object once while JSON and str() repeat it: ``[[s] * 1000] * 1000``
pickles to a few KB and is hundreds of MB of text. Such a result, or an exception carrying
one, must fail (or be described) without the daemon ever building that text: its memory
stays low and its loop is never blocked, for every kind of job. And ``max_result_size`` is
one measure for every kind: the UTF-8 bytes of the JSON text that would be stored."""

from __future__ import annotations

import re

import pytest

from tests.helpers import daemon_table, peak_rss

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20

PLUGIN = """
import taskd


def shared(k, width):
    s = "x" * width
    row = [s] * k
    return [row] * k  # about k * k * (width + 4) bytes of JSON, a few KB of pickle


def shared_cpu(k: int = 1000, width: int = 300):
    return shared(k, width)


def shared_blocking(k: int = 1000, width: int = 300):
    return shared(k, width)


async def shared_io(ctx, k: int = 1000, width: int = 300):
    return shared(k, width)


def raise_cpu(k: int = 1000, width: int = 300):
    raise ValueError(shared(k, width))


def raise_blocking(k: int = 1000, width: int = 300):
    raise ValueError(shared(k, width))


async def raise_io(ctx, k: int = 1000, width: int = 300):
    raise ValueError(shared(k, width))


def text_cpu(n: int, char: str = "a"):
    return char * n


def text_blocking(n: int, char: str = "a"):
    return char * n


async def text_io(ctx, n: int, char: str = "a"):
    return char * n


def floats_cpu(n: int):
    return [0.0] * n  # 5 bytes an item as JSON, 9 as pickle


@taskd.hookimpl
def taskd_job_types():
    T = taskd.JobType
    return [
        T("shared_cpu", shared_cpu, kind="cpu"),
        T("shared_blocking", shared_blocking, kind="blocking"),
        T("shared_io", shared_io, kind="io"),
        T("raise_cpu", raise_cpu, kind="cpu"),
        T("raise_blocking", raise_blocking, kind="blocking"),
        T("raise_io", raise_io, kind="io"),
        T("text_cpu", text_cpu, kind="cpu"),
        T("text_blocking", text_blocking, kind="blocking"),
        T("text_io", text_io, kind="io"),
        T("floats_cpu", floats_cpu, kind="cpu"),
    ]
"""


def startup_job(name: str, jtype: str, **options: object) -> str:
    opts = "".join(
        f"{k} = {v!r}\n" if isinstance(v, int) else f'{k} = "{v}"\n' for k, v in options.items()
    )
    return f'[jobs.{name}]\ntype = "{jtype}"\non = "startup"\n[jobs.{name}.options]\n{opts}\n'


@pytest.mark.parametrize("kind", ["cpu", "blocking", "io"])
class TestSharedReferences:
    """A result or exception that is small in memory and huge as text fails or is described
    in well under a second, the daemon staying small and its loop free."""

    def test_huge_text_is_never_built(self, daemon_factory, kind: str) -> None:
        config = daemon_table() + startup_job("big", f"shared_{kind}")
        config += startup_job("loud", f"raise_{kind}")
        d = daemon_factory(config, {"lab.py": PLUGIN}).start()
        big = d.wait_for("run", job="big", timeout=60)[0]
        loud = d.wait_for("run", job="loud", timeout=60)[0]
        peak = peak_rss(d.pid)
        print(
            f"{kind}: daemon peak RSS {peak / MiB:.0f} MiB, runs {big['duration']:.3f}s "
            f"and {loud['duration']:.3f}s"
        )

        assert big["outcome"] == "failed" and loud["outcome"] == "failed", (big, loud)
        assert peak < 150 * MiB, f"the daemon grew to {peak / MiB:.0f} MiB"
        assert d.events("loop_blocked") == []
        assert big["error"].startswith("ResultTooLarge: the result (list) is "), big
        assert "over max_result_size=1048576 bytes (1 MiB)" in big["error"], big
        assert "job 'big'" not in big["error"], big  # the run line names the run already
        assert big["duration"] < 20, big

        assert loud["error"].startswith("ValueError: [['xxx"), loud
        assert len(loud["error"]) < 4200, len(loud["error"])
        assert loud["duration"] < 20, loud

        assert d.stop() == 0
        assert max(len(line) for line in d.raw) < 8192
        rows = {row["job"]: row for row in d.history()}
        assert rows["big"]["result"] is None and len(rows["loud"]["error"]) < 4200


class TestOneMeasure:
    """max_result_size counts UTF-8 bytes of the stored JSON text, the same for every kind:
    a result of exactly the limit passes, one byte more fails."""

    LIMIT = 1000

    def test_the_boundary_is_the_same_for_every_kind(self, daemon_factory) -> None:
        jobs = ""
        expect: dict[str, str] = {}
        for kind in ("cpu", "blocking", "io"):
            # "a" * n is n + 2 bytes of JSON; "é" * n is 2n + 2 (counted as bytes of UTF-8,
            # not as the 6-character escape \\u00e9).
            for name, n, char, outcome in (
                ("ascii-at", self.LIMIT - 2, "a", "succeeded"),
                ("ascii-over", self.LIMIT - 1, "a", "failed"),
                ("utf8-at", (self.LIMIT - 2) // 2, "é", "succeeded"),
                ("utf8-over", (self.LIMIT - 2) // 2 + 1, "é", "failed"),
            ):
                job = f"{kind}-{name}"
                jobs += startup_job(job, f"text_{kind}", n=n, char=char)
                expect[job] = outcome
        # 200 floats: 1000 bytes of JSON, about 1,800 of pickle. The pickle bound is a
        # transport guard well above the limit: pickle's overhead never fails such a result.
        jobs += startup_job("floats-at", "floats_cpu", n=200)
        jobs += startup_job("floats-over", "floats_cpu", n=201)
        expect |= {"floats-at": "succeeded", "floats-over": "failed"}
        config = daemon_table(max_result_size=str(self.LIMIT)) + jobs
        d = daemon_factory(config, {"lab.py": PLUGIN}).start()
        runs = {job: d.wait_for("run", job=job, timeout=60)[0] for job in expect}
        assert {job: run["outcome"] for job, run in runs.items()} == expect
        for run in runs.values():
            if run["outcome"] == "failed":
                error = run["error"]
                assert error.startswith("ResultTooLarge: the result ("), run
                size = re.search(r"is (more than )?(\d+) bytes as JSON \(UTF-8, as stored\)", error)
                assert size and (size[1] or 1000 < int(size[2]) <= 1005), run
                assert "over max_result_size=1000 bytes (1 KB);" in error, run
                assert "MiB" not in error and "job '" not in error, run
        assert d.stop() == 0
        stored = {row["job"]: row["result"] for row in d.history()}
        for kind in ("cpu", "blocking", "io"):
            assert len(stored[f"{kind}-ascii-at"].encode()) == self.LIMIT
            assert len(stored[f"{kind}-utf8-at"].encode()) == self.LIMIT
            assert stored[f"{kind}-utf8-at"].startswith('"éé')  # stored as UTF-8, unescaped
