"""What one http_check run of 100 URLs costs the daemon: CPU time and wall time per run,
against the loopback aiohttp server of the tests (tests/loopback_http.py) running in a
process of its own, so its CPU is not counted. The job runs as in the daemon: options checked
and converted, the session a ctx.resource kept across runs, on uvloop.

Variants: plain HTTP and HTTPS (a self-signed certificate, trusted through ca_file), each with
the session kept across runs (what the plugin does) and with a new session per run (what a
plugin without ctx.resource would do: every run pays new connections and TLS handshakes).

    .venv/bin/python bench/http_check.py [--urls 100] [--runs 20] [--concurrency 20]

Prints one table (medians over --runs, after one warm-up run); asserts nothing."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from taskd import log as logsetup  # noqa: E402
from taskd.plugin.options import check_options, convert_options  # noqa: E402
from taskd.run.context import JobContext  # noqa: E402
from taskd.run.resources import Resources  # noqa: E402
from taskd.state.shared import SharedState  # noqa: E402
from tests.plugins_bundled.conftest import load_dropin  # noqa: E402

SERVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.loopback_http import LoopbackServer
srv = LoopbackServer(tls_dir=Path(sys.argv[2])).start()
print(srv.port, srv.tls_port, srv.cert, flush=True)
sys.stdin.read()  # until the bench closes our stdin
srv.stop()
"""


async def measure(
    jt: Any, options: dict[str, Any], runs: int, keep_session: bool
) -> tuple[float, float]:
    """Median CPU ms and wall ms per run."""
    assert not check_options(jt, options)
    kwargs = convert_options(jt, options)
    state = SharedState()
    resources = Resources(structlog.get_logger("bench"))
    cpu: list[float] = []
    wall: list[float] = []
    for i in range(runs + 1):
        ctx = JobContext(
            job="bench", run_id=f"r{i}", attempt=1, scheduled=0.0, state=state, resources=resources
        )
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            result = await jt.func(ctx, **kwargs)
        finally:
            ctx.release_resources()
            if not keep_session:
                await resources.close_all()
                resources = Resources(structlog.get_logger("bench"))
        c1, w1 = time.process_time(), time.perf_counter()
        assert result["failed"] == 0, result
        if i:  # the first run opens the session either way: a warm-up
            cpu.append((c1 - c0) * 1000)
            wall.append((w1 - w0) * 1000)
    await resources.close_all()
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=100)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        logsetup.configure("warning", "json", sink)
        jt = load_dropin(REPO / "plugins" / "http_check.py", "_bench_http_check").taskd_job_types()[
            0
        ]
        with tempfile.TemporaryDirectory() as tmp:
            server = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(REPO), tmp],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert server.stdout is not None
                port, tls_port, cert = server.stdout.readline().split()
                print(
                    f"http_check: {args.urls} URLs per run, concurrency {args.concurrency}, "
                    f"uvloop, median of {args.runs} runs (server in another process)"
                )
                print(f"{'variant':44} {'CPU ms/run':>11} {'wall ms/run':>12}")
                for scheme, base, extra in (
                    ("http", f"http://127.0.0.1:{port}", {}),
                    ("https", f"https://localhost:{tls_port}", {"ca_file": cert}),
                ):
                    urls = [f"{base}/ok?i={i}" for i in range(args.urls)]
                    options = {"urls": urls, "concurrency": args.concurrency, **extra}
                    for keep in (True, False):
                        cpu, wall = uvloop.run(measure(jt, options, args.runs, keep))
                        how = "session kept (ctx.resource)" if keep else "new session per run"
                        print(f"{scheme + ', ' + how:44} {cpu:11.1f} {wall:12.1f}")
            finally:
                assert server.stdin is not None
                server.stdin.close()
                server.wait(30)


if __name__ == "__main__":
    main()
