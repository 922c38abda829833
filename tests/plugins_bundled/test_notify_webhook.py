"""The bundled notify_webhook plugin: its settings, which events become POSTs (de-duplication,
rate limits, recoveries), and real POSTs to a loopback aiohttp server, a hung one included."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

import taskd
from tests.loopback_http import LoopbackServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nw(load_plugin: Callable[[str], types.ModuleType]) -> types.ModuleType:
    return load_plugin("notify_webhook")


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


def ev(kind: str, job: str = "backup", error: str | None = None, **kw: Any) -> taskd.JobEvent:
    return taskd.JobEvent(
        kind=taskd.EventKind(kind),
        job=job,
        run_id="r1",
        scheduled=datetime(2026, 12, 2, tzinfo=UTC),
        attempt=1,
        error=error,
        **kw,
    )


def policy(nw: types.ModuleType, **env: str) -> Any:
    settings = nw.read_settings({"TASKD_WEBHOOK_URL": "http://x/", **env})
    return nw.Policy(settings, host="h1")


class TestSettings:
    """Every variable is checked when the plugin loads; mistakes name the variable."""

    def test_defaults(self, nw: types.ModuleType) -> None:
        s = nw.read_settings({})
        assert s.url is None and s.timeout == 5.0 and s.repeat == 3600.0
        assert s.events == {"failed", "timed_out", "recovered"}

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            (
                {"TASKD_WEBHOOK_TIMOUT": "1s"},
                "unknown variable TASKD_WEBHOOK_TIMOUT (did you mean TASKD_WEBHOOK_TIMEOUT?)",
            ),
            ({"TASKD_WEBHOOK_URL": "hooks.example"}, "TASKD_WEBHOOK_URL must start with http://"),
            ({"TASKD_WEBHOOK_FORMAT": "xml"}, "TASKD_WEBHOOK_FORMAT must be json or slack"),
            ({"TASKD_WEBHOOK_EVENTS": "failed,boom"}, "(unknown: boom)"),
            ({"TASKD_WEBHOOK_TIMEOUT": "5 min"}, "TASKD_WEBHOOK_TIMEOUT='5 min'"),
            ({"TASKD_WEBHOOK_TIMEOUT": "2m"}, "must be from 0.1s to 60s"),
            ({"TASKD_WEBHOOK_MAX_PER_MINUTE": "many"}, "MAX_PER_MINUTE must be a whole number"),
        ],
    )
    def test_wrong(self, nw: types.ModuleType, env: dict[str, str], message: str) -> None:
        with pytest.raises(nw.SettingsError) as info:
            nw.read_settings(env)
        assert message in str(info.value)


class TestPolicy:
    """Which events are sent: final failures, time-outs, recoveries; not repeats, not floods."""

    def test_failure_then_recovery(self, nw: types.ModuleType) -> None:
        p = policy(nw)
        assert p.decide(ev("started"), 0) is None
        assert p.decide(ev("retrying", error="E"), 0) is None  # retries are not final
        sent = p.decide(ev("failed", error="OSError: disk"), 1)
        assert sent["event"] == "failed" and sent["job"] == "backup" and sent["host"] == "h1"
        assert sent["text"] == "taskd on h1: job backup failed: OSError: disk"
        assert sent["failures"] == 1 and sent["not_sent"] == 0
        back = p.decide(ev("succeeded"), 100)
        assert back["event"] == "recovered"
        assert back["text"] == "taskd on h1: job backup recovered after 1 failed run(s) in 99s"
        assert p.decide(ev("succeeded"), 101) is None  # only the first success

    def test_the_same_failure_is_not_repeated_until_repeat(self, nw: types.ModuleType) -> None:
        p = policy(nw, TASKD_WEBHOOK_REPEAT="10m", TASKD_WEBHOOK_MIN_INTERVAL="0")
        assert p.decide(ev("failed", error="E"), 0) is not None
        for t in range(1, 5):
            assert p.decide(ev("failed", error="E"), t * 60) is None
        again = p.decide(ev("failed", error="E"), 601)
        assert again["failures"] == 6 and again["not_sent"] == 4
        assert again["text"].endswith(
            "(6 failures in a row); 4 more not sent (rate limit or repeat)"
        )
        # A different error is news, sent at once.
        assert p.decide(ev("failed", error="F"), 602)["error"] == "F"
        assert p.decide(ev("timed_out", duration=3.0), 603)["text"] == (
            "taskd on h1: job backup timed out after 3.0s (8 failures in a row)"
        )

    def test_min_interval_per_job(self, nw: types.ModuleType) -> None:
        p = policy(nw, TASKD_WEBHOOK_MIN_INTERVAL="1m")
        assert p.decide(ev("failed", error="A"), 0) is not None
        assert p.decide(ev("failed", error="B"), 30) is None  # another error, too soon
        assert p.decide(ev("failed", job="other", error="A"), 30) is not None  # another job
        assert p.decide(ev("failed", error="C"), 61)["not_sent"] == 1
        assert p.decide(ev("succeeded"), 62)["event"] == "recovered"  # never held back

    def test_max_per_minute_in_all(self, nw: types.ModuleType) -> None:
        p = policy(nw, TASKD_WEBHOOK_MAX_PER_MINUTE="3")
        sent = [p.decide(ev("failed", job=f"j{i}", error="E"), i) for i in range(10)]
        assert sum(s is not None for s in sent) == 3 and p.dropped == 7
        assert p.decide(ev("failed", job="j9", error="E"), 61)["not_sent"] == 1

    def test_events_and_slack_format(self, nw: types.ModuleType) -> None:
        p = policy(nw, TASKD_WEBHOOK_EVENTS="timed_out", TASKD_WEBHOOK_FORMAT="slack")
        assert p.decide(ev("failed", error="E"), 0) is None
        assert p.decide(ev("timed_out", duration=1.0), 1) == {
            "text": "taskd on h1: job backup timed out after 1.0s (2 failures in a row)"
        }
        assert p.decide(ev("succeeded"), 2) is None  # recoveries not asked for

    def test_a_long_error_is_cut(self, nw: types.ModuleType) -> None:
        sent = policy(nw).decide(ev("failed", error="x" * 5000), 0)
        assert len(sent["error"]) == 1000


class TestPost:
    """Real POSTs to the loopback server; a hung or failing webhook is logged, never raised."""

    async def test_payload_received(self, nw: types.ModuleType, server: LoopbackServer) -> None:
        n = nw.Notifier(nw.read_settings({"TASKD_WEBHOOK_URL": server.url + "/hook"}))
        await n.on_event(ev("failed", error="E"))
        [payload] = server.received()
        assert payload["event"] == "failed" and payload["error"] == "E"
        server.wait_open(0)  # its session (and connection) closed with the POST

    async def test_a_hung_webhook_times_out(
        self, nw: types.ModuleType, server: LoopbackServer
    ) -> None:
        server.hook_delay = 30
        settings = nw.read_settings(
            {"TASKD_WEBHOOK_URL": server.url + "/hook", "TASKD_WEBHOOK_TIMEOUT": "300ms"}
        )
        from structlog.testing import capture_logs

        with capture_logs() as logs:
            await nw.Notifier(settings).on_event(ev("failed", error="E"))
        [line] = [x for x in logs if x["event"] == "webhook_failed"]
        assert line["error"].startswith("no answer within 0.")

    async def test_a_stop_cuts_a_hung_post_short(
        self, nw: types.ModuleType, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(nw, "STOP_GRACE", 0.2)
        server.hook_delay = 30
        n = nw.Notifier(
            nw.read_settings(
                {"TASKD_WEBHOOK_URL": server.url + "/hook", "TASKD_WEBHOOK_TIMEOUT": "60s"}
            )
        )
        task = asyncio.ensure_future(n.on_event(ev("failed", error="E")))
        while not server.received():  # noqa: ASYNC110 - the server is in another thread
            await asyncio.sleep(0.02)
        n.stop_soon()
        await asyncio.wait_for(task, 10)  # well before the 60 s timeout

    async def test_an_error_status_is_logged(
        self, nw: types.ModuleType, server: LoopbackServer
    ) -> None:
        from structlog.testing import capture_logs

        server.hook_status = 500
        with capture_logs() as logs:
            await nw.Notifier(
                nw.read_settings({"TASKD_WEBHOOK_URL": server.url + "/hook"})
            ).on_event(ev("failed", error="E"))
        assert [x["status"] for x in logs if x["event"] == "webhook_failed"] == [500]

    async def test_a_redirect_is_a_failure_not_a_lost_post(
        self, nw: types.ModuleType, server: LoopbackServer
    ) -> None:
        """A 301 followed would turn the POST into a GET: the payload lost, yet "sent"."""
        from structlog.testing import capture_logs

        url = server.url + "/moved/SECRET-moved"
        with capture_logs() as logs:
            await nw.Notifier(nw.read_settings({"TASKD_WEBHOOK_URL": url})).on_event(
                ev("failed", error="E")
            )
        assert [x["event"] for x in logs if x["event"].startswith("webhook_")] == ["webhook_failed"]
        [line] = [x for x in logs if x["event"] == "webhook_failed"]
        assert line["status"] == 301
        assert line["location"] == f"{server.url}/…"
        assert "TASKD_WEBHOOK_URL" in line["hint"]
        assert server.requests[-1] == ("POST", "/moved/SECRET-moved")  # nothing followed
        assert "SECRET" not in repr(logs)

    @pytest.mark.parametrize(
        "where",
        [
            "/loop/SECRET-loop",  # 302 to itself
            "raw",  # an answer that is not HTTP: aiohttp's error prints the URL
            "invalid",  # a URL aiohttp cannot use: its error is the URL
        ],
    )
    async def test_errors_never_log_the_url(
        self, nw: types.ModuleType, server: LoopbackServer, where: str
    ) -> None:
        """The webhook's URL is a secret: an error names the scheme and host, not the path."""
        from structlog.testing import capture_logs

        async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            writer.close()

        raw = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = raw.sockets[0].getsockname()[1]
        url = {
            "raw": f"http://127.0.0.1:{port}/hook/SECRET-raw",
            "invalid": "http://127.0.0.1:99999999/hook/SECRET-invalid",
        }.get(where, server.url + where)
        try:
            with capture_logs() as logs:
                await nw.Notifier(nw.read_settings({"TASKD_WEBHOOK_URL": url})).on_event(
                    ev("failed", error="E")
                )
        finally:
            raw.close()
            await raw.wait_closed()
        failed = [x for x in logs if x["event"] == "webhook_failed"]
        assert len(failed) == 1, logs
        assert "SECRET" not in repr(logs)


def test_hooks_only(nw: types.ModuleType) -> None:
    assert not hasattr(nw, "taskd_job_types")
