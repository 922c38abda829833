"""A small sd_notify client: readiness, reload, stop, status and watchdog for ``Type=notify``.

Outside systemd (no ``NOTIFY_SOCKET``) every method is a no-op, so the daemon calls it
unconditionally. No dependency on libsystemd: the protocol is one datagram of
``KEY=VALUE`` lines to a UNIX socket (see ``sd_notify(3)``), much as gunicorn's
``systemd.py`` does it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType

import structlog

__all__ = ["Notifier"]

log = structlog.get_logger("taskd.systemd")

# The variables systemd hands a notify-type service; see sd_notify(3) and sd_watchdog_enabled(3).
_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends state changes to systemd's notify socket; a no-op when not run by systemd.

    Build it with :meth:`from_env`. One non-blocking datagram socket is opened for the
    notifier's life; a failed send is logged once and never raised, because losing a
    notification must not take the daemon down (systemd will notice on its own: a missing
    ``READY=1`` times the start out, missing pings trip the watchdog).
    """

    enabled: bool
    """True when systemd gave us a notify socket; when False every method does nothing."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """Open a notifier on ``address`` (a path, or ``@name`` for the abstract namespace).

        ``address=None`` gives a disabled notifier. ``watchdog_usec`` is systemd's
        ``WATCHDOG_USEC``: the interval after which systemd declares the service hung.
        """
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._send_failed = False
        if address:
            # A leading "@" is systemd's spelling of Linux's abstract namespace (leading NUL).
            self._address = "\0" + address[1:] if address.startswith("@") else address
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Never let a slow or wedged systemd stall the event loop: drop the message instead.
            sock.setblocking(False)
            self._sock = sock
        self.enabled = self._sock is not None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ``. The watchdog is ignored when ``WATCHDOG_PID``
        names another process: the variables were inherited from a parent that systemd
        actually watches. With ``unset_environment=True`` (only for ``os.environ``) the
        variables are removed so that children (a ``command`` job's shell, pool workers)
        cannot send messages in the daemon's name.
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid.strip() == str(os.getpid()):
            try:
                watchdog_usec = int(env.get("WATCHDOG_USEC", ""))
            except ValueError:
                watchdog_usec = None
        if unset_environment and environ is None:
            for name in _ENV_VARS:
                os.environ.pop(name, None)
        return cls(address, watchdog_usec)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`ping` calls (half of ``WatchdogSec=``), None without a watchdog.

        Half the deadline, as sd_watchdog_enabled(3) recommends, so one late ping is not fatal.
        """
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *assignments: str) -> None:
        """Send raw ``KEY=VALUE`` assignments in one datagram (for messages without a helper)."""
        sock, address = self._sock, self._address
        if sock is None or address is None or not assignments:
            return
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            sock.sendto(data, address)
        except OSError as exc:
            # Once is enough: a gone socket fails every ping, and a log line each time would
            # flood the journal of a daemon that is otherwise working.
            if not self._send_failed:
                self._send_failed = True
                log.warning(
                    "sd_notify failed; further failures are not logged",
                    socket=self._address_for_humans(),
                    message=data.decode("utf-8", "replace").replace("\n", " "),
                    error=str(exc),
                )

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up (or a reload) is complete: ``READY=1``, plus ``STATUS=``."""
        self.notify("READY=1", *self._status_lines(status))

    def reloading(self) -> None:
        """Tell systemd a reload began: ``RELOADING=1`` with ``MONOTONIC_USEC``.

        The timestamp lets systemd (253+, ``Type=notify-reload``) match the message to the
        reload it asked for; older versions ignore it. Follow with :meth:`ready` when done,
        whether the new config was taken or rejected.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> None:
        """Tell systemd the daemon is shutting down: ``STOPPING=1``, plus ``STATUS=``."""
        self.notify("STOPPING=1", *self._status_lines(status))

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows."""
        self.notify(*self._status_lines(text))

    def ping(self) -> None:
        """Tell the watchdog the loop is alive: ``WATCHDOG=1``; a no-op without a watchdog.

        Call it from the event loop itself (not a thread), so that a blocked loop stops the
        pings and systemd restarts the service.
        """
        if self.watchdog_interval is not None:
            self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; the notifier is disabled from then on. Safe to call twice."""
        sock, self._sock = self._sock, None
        self.enabled = False
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self.enabled:
            return "<Notifier disabled>"
        return f"<Notifier {self._address_for_humans()} watchdog={self.watchdog_interval}>"

    @staticmethod
    def _status_lines(text: str | None) -> tuple[str, ...]:
        # A newline would end the STATUS= assignment and start a bogus one.
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.splitlines()),)

    def _address_for_humans(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address
