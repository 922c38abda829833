"""The sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from taskd.systemd import Notifier


class Listener:
    """A datagram socket bound where systemd's notify socket would be; reads what arrives."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET would hold: a path or "@abstract"

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def empty(self) -> bool:
        # Datagrams to a local socket are queued by the time sendto() returns: no wait needed.
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield Listener(sock, path)
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"taskd-test-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield Listener(sock, "@" + name)
    sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    fixture: Listener = request.getfixturevalue(f"{request.param}_listener")
    return fixture


@pytest.fixture
def notifier(listener: Listener) -> Iterator[Notifier]:
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "3000000"})
    yield n
    n.close()


class TestMessages:
    """Each method sends exactly the datagram systemd expects, to a path or abstract socket."""

    def test_ready(self, notifier: Notifier, listener: Listener) -> None:
        assert notifier.enabled
        notifier.ready()
        assert listener.recv() == b"READY=1"

    def test_ready_with_status(self, notifier: Notifier, listener: Listener) -> None:
        notifier.ready("3 jobs scheduled")
        assert listener.recv() == b"READY=1\nSTATUS=3 jobs scheduled"

    def test_reloading_carries_monotonic_usec(self, notifier: Notifier, listener: Listener) -> None:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = listener.recv().split(b"\n")
        assert first == b"RELOADING=1"
        key, _, value = second.partition(b"=")
        assert key == b"MONOTONIC_USEC"
        assert before <= int(value) <= after

    def test_stopping(self, notifier: Notifier, listener: Listener) -> None:
        notifier.stopping()
        assert listener.recv() == b"STOPPING=1"
        notifier.stopping("waiting for 2 runs")
        assert listener.recv() == b"STOPPING=1\nSTATUS=waiting for 2 runs"

    def test_status(self, notifier: Notifier, listener: Listener) -> None:
        notifier.status("idle")
        assert listener.recv() == b"STATUS=idle"

    def test_status_newlines_cannot_inject_assignments(
        self, notifier: Notifier, listener: Listener
    ) -> None:
        notifier.status("bad config\nREADY=1")
        assert listener.recv() == b"STATUS=bad config READY=1"

    def test_ping(self, notifier: Notifier, listener: Listener) -> None:
        notifier.ping()
        assert listener.recv() == b"WATCHDOG=1"

    def test_status_is_utf8(self, notifier: Notifier, listener: Listener) -> None:
        notifier.status("job «backup» ok")
        assert listener.recv() == "STATUS=job «backup» ok".encode()


class TestWatchdog:
    """watchdog_interval is half of WATCHDOG_USEC, and only for the process systemd watches."""

    def test_interval_is_half_the_deadline(self, listener: Listener) -> None:
        env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "30000000"}
        with Notifier.from_env(env) as n:
            assert n.watchdog_interval == 15.0

    def test_matching_pid_keeps_watchdog(self, listener: Listener) -> None:
        env = {
            "NOTIFY_SOCKET": listener.env_value,
            "WATCHDOG_USEC": "2000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
        with Notifier.from_env(env) as n:
            assert n.watchdog_interval == 1.0
            n.ping()
            assert listener.recv() == b"WATCHDOG=1"

    def test_other_pid_disables_watchdog_only(self, listener: Listener) -> None:
        env = {
            "NOTIFY_SOCKET": listener.env_value,
            "WATCHDOG_USEC": "2000000",
            "WATCHDOG_PID": str(os.getpid() + 1),
        }
        with Notifier.from_env(env) as n:
            assert n.enabled
            assert n.watchdog_interval is None
            n.ping()
            n.ready()
            # The ping was dropped: the first datagram to arrive is READY=1.
            assert listener.recv() == b"READY=1"

    @pytest.mark.parametrize("value", [None, "", "0", "soon", "-5"])
    def test_no_or_bad_watchdog_usec(self, listener: Listener, value: str | None) -> None:
        env = {"NOTIFY_SOCKET": listener.env_value}
        if value is not None:
            env["WATCHDOG_USEC"] = value
        with Notifier.from_env(env) as n:
            assert n.watchdog_interval is None
            n.ping()
            assert listener.empty()


class TestOutsideSystemd:
    """Without NOTIFY_SOCKET every method is a no-op that neither sends nor raises."""

    @pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "1000000"}])
    def test_disabled(self, env: dict[str, str]) -> None:
        n = Notifier.from_env(env)
        assert not n.enabled
        assert n.watchdog_interval is None
        n.ready("x")
        n.reloading()
        n.status("x")
        n.ping()
        n.stopping("x")
        n.close()

    def test_reads_os_environ_by_default(
        self, monkeypatch: pytest.MonkeyPatch, listener: Listener
    ) -> None:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        with Notifier.from_env() as n:
            assert n.watchdog_interval == 2.0
            n.ready()
            assert listener.recv() == b"READY=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not Notifier.from_env().enabled

    def test_unset_environment_hides_socket_from_children(
        self, monkeypatch: pytest.MonkeyPatch, listener: Listener
    ) -> None:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        with Notifier.from_env(unset_environment=True) as n:
            assert n.enabled
            assert n.watchdog_interval == 2.0
            assert "NOTIFY_SOCKET" not in os.environ
            assert "WATCHDOG_USEC" not in os.environ


class TestErrors:
    """A failed send is logged once and never raised."""

    def test_missing_socket_logged_once(self, tmp_path: Path) -> None:
        env = {"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000000"}
        with capture_logs() as logs, Notifier.from_env(env) as n:
            n.ready()
            n.ping()
            n.ping()
        assert len(logs) == 1
        assert logs[0]["log_level"] == "warning"
        assert logs[0]["socket"] == str(tmp_path / "gone")
        assert logs[0]["message"] == "READY=1"

    def test_full_socket_does_not_block(self, path_listener: Listener) -> None:
        # Nobody reads the listener, so its queue fills; a blocking send would hang here.
        env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "1000000"}
        with capture_logs() as logs, Notifier.from_env(env) as n:
            for _ in range(10_000):
                n.ping()
        assert len(logs) == 1
        assert "Resource temporarily unavailable" in logs[0]["error"]

    def test_closed_notifier_is_disabled(self, listener: Listener) -> None:
        n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value})
        n.close()
        n.close()
        assert not n.enabled
        n.ready()
        assert listener.empty()
        assert repr(n) == "<Notifier disabled>"
