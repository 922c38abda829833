"""The bundled http_check plugin against a real aiohttp server on loopback: statuses, slow
answers past the timeout, connection resets, redirects, a self-signed TLS endpoint with and
without its CA, body checks, the concurrency limit, the shared state and the bounded result."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import taskd
from taskd.plugin.options import check_options, convert_options
from taskd.run.context import JobContext
from taskd.run.resources import Resources
from taskd.state.shared import SharedState
from tests.loopback_http import LoopbackServer

pytestmark = pytest.mark.timeout(60)

Run = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    with LoopbackServer(tls_dir=tmp_path_factory.mktemp("tls")) as srv:
        yield srv


@pytest.fixture
def plugin(load_plugin: Callable[[str], types.ModuleType]) -> types.ModuleType:
    return load_plugin("http_check")


@pytest.fixture
def job_type(plugin: types.ModuleType) -> taskd.JobType:
    [jt] = plugin.taskd_job_types()
    return jt


class Runner:
    """Runs the job as the daemon would: options checked and converted as from TOML, one
    shared state, the job's resources kept across runs and closed at the end."""

    def __init__(self, jt: taskd.JobType) -> None:
        self.jt = jt
        self.state = SharedState()
        self.resources = Resources(structlog.get_logger("test"))
        self.runs = 0

    async def __call__(self, job: str = "site", **options: Any) -> dict[str, Any]:
        problems = check_options(self.jt, options)
        assert not problems, problems
        self.runs += 1
        ctx = JobContext(
            job=job,
            run_id=f"r{self.runs}",
            attempt=1,
            scheduled=0.0,
            state=self.state,
            resources=self.resources,
        )
        try:
            result: dict[str, Any] = await self.jt.func(ctx, **convert_options(self.jt, options))
            return result
        finally:
            ctx.release_resources()


@pytest.fixture
async def run(job_type: taskd.JobType) -> AsyncIterator[Runner]:
    runner = Runner(job_type)
    yield runner
    await runner.resources.close_all()


class TestOptions:
    """Options are checked when the config loads, tables of URLs included."""

    def test_plain_urls_and_tables_pass(self, job_type: taskd.JobType) -> None:
        urls = ["http://a/", {"url": "http://b/", "status": [200, 204], "timeout": "2s"}]
        assert check_options(job_type, {"urls": urls}) == []
        kwargs = convert_options(job_type, {"urls": urls, "timeout": "3s"})
        assert kwargs["urls"][1]["timeout"].total_seconds() == 2.0
        assert kwargs["timeout"].total_seconds() == 3.0

    @pytest.mark.parametrize(
        ("urls", "message"),
        [
            (
                [{"url": "http://a/", "stauts": 200}],
                "item 0: unknown key 'stauts' in a URLCheck table (did you mean 'status'?)",
            ),
            ([{"url": "http://a/", "timeout": "soon"}], "key 'timeout': cannot read 'soon'"),
            ([{"status": 200}], "missing key 'url'"),
            ([{"url": "http://a/", "method": "GTE"}], "key 'method': expected one of"),
            ([{"url": "http://a/", "status": "200"}], "key 'status': expected int | list[int]"),
            (["http://a/", 3], "item 1: expected str | URLCheck, got an integer"),
        ],
    )
    def test_a_wrong_table_is_a_config_error(
        self, job_type: taskd.JobType, urls: list[Any], message: str
    ) -> None:
        [(key, problem, _)] = check_options(job_type, {"urls": urls})
        assert key == "urls"
        assert message in problem

    async def test_checks_that_need_the_values_fail_the_run_naming_the_entry(
        self, run: Runner, server: LoopbackServer
    ) -> None:
        with pytest.raises(ValueError, match=r"urls\[1\]: regex '\(' is not valid"):
            await run(urls=[server.url + "/ok", {"url": server.url + "/x", "regex": "("}])
        with pytest.raises(ValueError, match=r"urls\[0\]: 'ftp://x/' is not an http"):
            await run(urls=["ftp://x/"])
        with pytest.raises(ValueError, match=r"HEAD answer has none"):
            await run(urls=[{"url": server.url + "/ok", "method": "HEAD", "contains": "x"}])
        with pytest.raises(ValueError, match=r"listed twice \(also urls\[0\]\)"):
            await run(urls=[server.url + "/ok", server.url + "/ok"])
        with pytest.raises(ValueError, match=r"status must be HTTP codes"):
            await run(urls=[server.url + "/ok"], status=[200, 1000])


class TestProbes:
    """Each failure mode of a real server, in the operator's words."""

    async def test_all_ok(self, run: Runner, server: LoopbackServer) -> None:
        result = await run(urls=[server.url + "/ok", server.url + "/status/204"])
        assert result["urls"] == 2 and result["ok"] == 2 and result["failed"] == 0
        assert result["failures"] == []

    async def test_a_500_fails_the_run(self, run: Runner, server: LoopbackServer) -> None:
        with pytest.raises(Exception, match="1 of 2 URLs failed") as info:
            await run(urls=[server.url + "/ok", server.url + "/status/500"])
        assert f"{server.url}/status/500: status 500, expected 2xx" in str(info.value)
        assert type(info.value).__name__ == "HTTPCheckFailed"

    async def test_expected_statuses(self, run: Runner, server: LoopbackServer) -> None:
        result = await run(
            urls=[server.url + "/status/503", {"url": server.url + "/status/404", "status": 404}],
            status=[200, 503],
        )
        assert result["failed"] == 0

    async def test_slow_past_the_timeout(self, run: Runner, server: LoopbackServer) -> None:
        with pytest.raises(Exception, match=r"/slow\?s=5: timed out after 0.5s"):
            await run(urls=[{"url": server.url + "/slow?s=5", "timeout": "500ms"}])

    async def test_connection_reset(self, run: Runner, server: LoopbackServer) -> None:
        with pytest.raises(Exception, match="URLs failed") as info:
            await run(urls=[server.url + "/reset"])
        message = str(info.value)
        # A RST read as such, or (when it comes before the request is sent) a close.
        assert (
            "connection failed: Connection reset by peer" in message
            or "closed the connection without an answer" in message
        ), message

    async def test_nothing_listening(self, run: Runner) -> None:
        from tests.helpers import free_port

        url = f"http://127.0.0.1:{free_port()}/"
        with pytest.raises(Exception, match=r"cannot connect to 127.0.0.1:\d+: Connection refused"):
            await run(urls=[url])

    async def test_a_name_that_does_not_resolve(self, run: Runner) -> None:
        """A DNS failure says so, in the resolver's words (not "Unknown error -2")."""
        with pytest.raises(Exception, match="URLs failed") as info:
            await run(urls=["http://no-such-host.invalid/"], timeout="5s")
        message = str(info.value)
        assert "http://no-such-host.invalid/: cannot resolve host no-such-host.invalid: " in message
        assert "Unknown error" not in message

    async def test_a_url_or_header_that_cannot_be_sent_is_that_urls_failure(
        self, run: Runner, server: LoopbackServer
    ) -> None:
        """One URL aiohttp cannot send fails alone, named and recorded; max_failures counts it."""
        long_label = "http://" + "a" * 64 + ".example/"
        newline = {"url": server.url + "/echo", "headers": {"X-A": "a\r\nInjected: 1"}}
        urls = [server.url + "/ok", long_label, newline]
        result = await run(urls=urls, max_failures=2)
        assert result["ok"] == 1 and result["failed"] == 2
        errors = {f["url"]: f["error"] for f in result["failures"]}
        assert errors[long_label].startswith("the host name cannot be encoded (IDNA)")
        assert errors[server.url + "/echo"].startswith("the request cannot be sent: ")
        assert run.state.get("http_check/site")[long_label]["ok"] is False
        with pytest.raises(Exception, match="2 of 3 URLs failed") as info:
            await run(urls=urls)
        assert f"{long_label}: the host name cannot be encoded" in str(info.value)

    async def test_a_password_in_a_url_is_never_shown(self, run: Runner) -> None:
        """userinfo's password is masked in the state's key, the result, the run's error."""
        from tests.helpers import free_port

        url = f"http://user:PASSWORD-IN-URL@127.0.0.1:{free_port()}/x"
        masked = url.replace("PASSWORD-IN-URL", "***")
        with pytest.raises(Exception, match="URLs failed") as info:
            await run(urls=[url])
        assert masked in str(info.value)
        result = await run(urls=[url, "http://u:PW2@127.0.0.1:99999/"], max_failures=2)
        shown = repr(
            (str(info.value), info.value.failures, result, run.state.get("http_check/site"))
        )  # type: ignore[attr-defined]
        assert "PASSWORD-IN-URL" not in shown and "PW2" not in shown
        assert set(run.state.get("http_check/site")) == {masked, "http://u:***@127.0.0.1:99999/"}
        with pytest.raises(
            ValueError, match=r"urls\[1\]: 'http://u:\*\*\*@h/' is listed twice"
        ) as dup:
            await run(urls=["http://u:A-SECRET@h/", "http://u:A-SECRET@h/"])
        assert "A-SECRET" not in str(dup.value)

    async def test_redirects(self, run: Runner, server: LoopbackServer) -> None:
        followed = await run(urls=[server.url + "/redirect"])
        assert followed["failed"] == 0
        assert run.state.get("http_check/site")[server.url + "/redirect"]["status"] == 200
        kept = await run(
            urls=[{"url": server.url + "/redirect", "status": 302}], follow_redirects=False
        )
        assert kept["failed"] == 0
        with pytest.raises(Exception, match="status 302, expected 2xx"):
            await run(urls=[server.url + "/redirect"], follow_redirects=False)

    async def test_body_checks(self, run: Runner, server: LoopbackServer) -> None:
        ok = await run(
            urls=[
                {"url": server.url + "/ok", "contains": "all good"},
                {"url": server.url + "/status/200", "regex": "^stat"},
            ]
        )
        assert ok["failed"] == 0
        with pytest.raises(Exception, match="body does not contain 'healthy'"):
            await run(urls=[server.url + "/ok"], contains="healthy")
        with pytest.raises(Exception, match=r"does not match regex 'y' \(in the first 1000 bytes"):
            await run(urls=[server.url + "/big?n=100000"], regex="y", max_body=1000)

    async def test_headers_and_method(self, run: Runner, server: LoopbackServer) -> None:
        await run(
            urls=[server.url + "/echo", {"url": server.url + "/ok", "headers": {"X-B": "2"}}],
            headers={"X-A": "1"},
            method="POST",
        )
        assert ("POST", "/echo") in server.requests
        echoed = await run(urls=[{"url": server.url + "/echo", "headers": {"X-B": "2"}}])
        assert echoed["failed"] == 0


class TestTLS:
    """Verification is on by default; a CA file makes a private certificate trusted."""

    async def test_self_signed_without_its_ca_fails(
        self, run: Runner, server: LoopbackServer
    ) -> None:
        with pytest.raises(Exception, match="TLS certificate not trusted") as info:
            await run(urls=[server.tls_url + "/ok"])
        assert "set option 'ca_file'" in str(info.value)

    async def test_with_its_ca_it_passes(self, run: Runner, server: LoopbackServer) -> None:
        result = await run(urls=[server.tls_url + "/ok"], ca_file=str(server.cert))
        assert result["failed"] == 0

    async def test_verification_off(self, run: Runner, server: LoopbackServer) -> None:
        result = await run(urls=[server.tls_url + "/ok"], verify_tls=False)
        assert result["failed"] == 0

    async def test_a_missing_ca_file_fails_the_run_clearly(
        self, run: Runner, server: LoopbackServer, tmp_path: Path
    ) -> None:
        with pytest.raises(ValueError, match=r"option 'ca_file' '.*nope.pem' cannot be used"):
            await run(urls=[server.tls_url + "/ok"], ca_file=str(tmp_path / "nope.pem"))


class TestConcurrency:
    """gather under a semaphore: at most ``concurrency`` at once, and that many really at once."""

    @pytest.mark.parametrize("concurrency", [2, 8])
    async def test_the_limit_holds_and_is_used(
        self, run: Runner, job_type: taskd.JobType, concurrency: int
    ) -> None:
        with LoopbackServer() as srv:
            urls = [f"{srv.url}/slow?s=0.3&i={i}" for i in range(8)]
            result = await run(urls=urls, concurrency=concurrency)
            assert result["failed"] == 0
            assert srv.max_inflight == concurrency

    async def test_one_session_and_its_connections_reused_across_runs(self, run: Runner) -> None:
        with LoopbackServer() as srv:
            urls = [f"{srv.url}/ok?i={i}" for i in range(3)]
            for _ in range(5):
                await run(urls=urls, concurrency=3)
            # 15 requests over at most 3 keep-alive connections: the session outlived each run.
            assert len(srv.requests) == 15
            assert srv.accepted <= 3
            assert srv.open_connections() == srv.accepted
            await run.resources.close_all()
            srv.wait_open(0)


class TestStateAndResult:
    """Every URL's outcome goes to the shared state; the result stays small."""

    async def test_state_has_each_url(self, run: Runner, server: LoopbackServer) -> None:
        ok, bad = server.url + "/ok", server.url + "/status/500"
        for _ in range(2):
            with pytest.raises(Exception, match="URLs failed"):
                await run(urls=[ok, bad])
        entry = run.state.get("http_check/site")
        assert set(entry) == {ok, bad}
        assert entry[ok]["ok"] is True and entry[ok]["status"] == 200 and entry[ok]["fails"] == 0
        assert entry[ok]["error"] is None and entry[ok]["latency"] > 0
        assert entry[bad]["fails"] == 2 and entry[bad]["error"] == "status 500, expected 2xx"
        since = entry[bad]["since"]
        # The URL recovers and another is dropped from the list: both show.
        await run(urls=[{"url": bad, "status": 500}])
        entry = run.state.get("http_check/site")
        assert set(entry) == {bad}
        assert entry[bad]["fails"] == 0 and entry[bad]["since"] >= since

    async def test_result_and_message_are_bounded(
        self, run: Runner, server: LoopbackServer
    ) -> None:
        long = "a" * 2000
        urls = [f"{server.url}/status/500?{long}&i={i}" for i in range(60)]
        with pytest.raises(Exception, match="60 of 60 URLs failed") as info:
            await run(urls=urls, list_limit=5, concurrency=20)
        assert "... and 50 more" in str(info.value)
        assert len(str(info.value)) < 10 * 500
        assert len(info.value.failures) == 5  # type: ignore[attr-defined]
        assert all(len(f["url"]) <= 300 for f in info.value.failures)  # type: ignore[attr-defined]
        result = await run(urls=urls, list_limit=5, max_failures=60)
        assert result["failed"] == 60 and len(result["failures"]) == 5
        assert result["failures_not_listed"] == 55

    async def test_max_failures(self, run: Runner, server: LoopbackServer) -> None:
        urls = [server.url + "/ok", server.url + "/status/500", server.url + "/status/502"]
        result = await run(urls=urls, max_failures=2)
        assert result["failed"] == 2 and result["ok"] == 1
        with pytest.raises(Exception, match=r"2 of 3 URLs failed \(max_failures 1\)"):
            await run(urls=urls, max_failures=1)


async def test_the_run_timeout_cancels_every_probe(run: Runner) -> None:
    """The job's own timeout (a cancel from the daemon) stops the gather and its probes."""
    with LoopbackServer() as srv:
        urls = [f"{srv.url}/slow?s=30&i={i}" for i in range(4)]
        task = asyncio.ensure_future(run(urls=urls, timeout="60s"))
        deadline = asyncio.get_running_loop().time() + 10
        while srv.inflight < 4:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await run.resources.close_all()
        srv.wait_open(0)


def test_contract(job_type: taskd.JobType, options_contract: Callable[..., None]) -> None:
    options_contract(job_type)
