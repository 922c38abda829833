"""Boot a throw-away systemd, as PID 1 of its own namespaces, to test units against.

The box runs ``/usr/lib/systemd/systemd`` as PID 1 of new pid, mount, uts, ipc, net and
cgroup namespaces, on an overlay of the host's ``/`` whose writes all go to a tmpfs; it gets
a cgroup2 subtree of its own under ``/sys/fs/cgroup/unified``. Nothing it does reaches the
host: the host's PID 1 is never signalled, and the checkout is bound in read-only. It is
the Python form of ``shared/reference/sdbox.sh``.

The project checkout (wherever it is: CI clones elsewhere), the venv and the interpreter the
venv points to are bound in at their own paths, so the venv's absolute paths (shebangs,
``pyvenv.cfg``, the editable install's finder) work inside the box unchanged.

Use from pytest::

    reason = SdBox.skip_reason()
    if reason:
        pytest.skip(reason)
    with SdBox() as box:
        box.sh("systemctl", "start", "foo")

or by hand, to poke at a box (``down`` needs the same ``--dir``)::

    python tests/integration/sdbox.py up --dir /tmp/box
    python tests/integration/sdbox.py sh --dir /tmp/box systemctl status
    python tests/integration/sdbox.py down --dir /tmp/box
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

SYSTEMD = "/usr/lib/systemd/systemd"
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
PROJECT = Path(__file__).resolve().parents[2]

# What a container manager would leave PID 1 (docker's set plus what systemd needs to set up
# units' sandboxes: sys_admin for mounts, setpcap to drop capabilities, sys_resource ...).
# The box cannot load modules, change the clock, reboot the host or touch raw I/O.
CAPS = (
    "-all,+chown,+dac_override,+dac_read_search,+fowner,+fsetid,+ipc_owner,+kill,+lease,"
    "+linux_immutable,+mknod,+net_bind_service,+net_broadcast,+net_raw,+net_admin,+setfcap,"
    "+setgid,+setpcap,+setuid,+sys_admin,+sys_boot,+sys_chroot,+sys_nice,+sys_ptrace,"
    "+sys_resource,+sys_tty_config,+audit_write"
)

# Units that fail or make no sense in a box (no real devices, clock, firmware, consoles);
# masking them keeps the boot fast and the box "running" rather than "degraded".
MASKED_UNITS = (
    "postgresql.service",
    "getty@tty1.service",
    "console-getty.service",
    "systemd-timesyncd.service",
    "systemd-modules-load.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-pstore.service",
    "systemd-firstboot.service",
    "systemd-random-seed.service",
    "systemd-repart.service",
    "e2scrub_reap.service",
    "timers.target",
)

# A clean environment for commands run in the box, so the host's (a venv's PATH, a tty's
# pager and colours) does not leak into systemctl's or journalctl's output.
BOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LOG_COLOR": "0",
    "TERM": "dumb",
}

_counter = itertools.count()


class BoxError(RuntimeError):
    """The box could not be booted or driven; the message carries the boot log's tail."""


class BoxCommandError(subprocess.CalledProcessError):
    """A command in the box exited non-zero; unlike its base, str() shows the output."""

    def __str__(self) -> str:
        text = f"in sdbox: {' '.join(map(str, self.cmd))!r} exited {self.returncode}"
        for name, out in (("stdout", self.stdout), ("stderr", self.stderr)):
            if out:
                text += f"\n--- {name} ---\n{str(out).rstrip()}"
        return text


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1
) -> T:
    """Call ``probe`` until it returns something truthy, and return that; fail at the deadline.

    The assertion message says what was awaited and what the probe last returned, which is
    usually the whole diagnosis.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(interval)


class SdBox:
    """One throw-away systemd. ``up()`` boots it, ``sh()`` runs commands in it, ``down()``
    kills it and removes every trace; also a context manager that always calls ``down()``."""

    def __init__(
        self,
        project: Path = PROJECT,
        *,
        extra_binds: Iterable[Path] = (),
        workdir: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.project = project.resolve()
        # Paths bound read-only into the box at their own paths: the checkout, the venv (it
        # may live outside the checkout) and the interpreter it was made from (its symlinks
        # point there). Inner paths already covered by an outer one are dropped.
        wanted = [
            self.project,
            Path(sys.prefix).resolve(),
            Path(sys.base_prefix).resolve(),
            *(Path(p).resolve() for p in extra_binds),
        ]
        self.binds: list[Path] = []
        for path in sorted(set(wanted), key=lambda p: len(p.parts)):
            if not any(path.is_relative_to(b) for b in self.binds):
                self.binds.append(path)
        self._workdir_given = workdir
        self._die_with_parent = die_with_parent
        self.workdir: Path | None = workdir
        # Our pid in the name lets a later run tell a leftover cgroup of a dead run from a
        # box another test session is using right now.
        self.name = f"sdbox-{os.getpid()}-{next(_counter)}"
        self.cgroup = CGROUP2_ROOT / self.name
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the box's PID 1 (systemd), as the host numbers it
        self.boot_seconds: float | None = None

    # ----------------------------------------------------------------- preconditions

    @staticmethod
    def skip_reason() -> str | None:
        """Why a box cannot be booted here (for ``pytest.skip``), or None when it can."""
        if sys.platform != "linux":
            return "sdbox needs Linux namespaces"
        if os.geteuid() != 0:
            return "sdbox needs root (it mounts, unshares namespaces and creates cgroups)"
        for tool in ("unshare", "nsenter", "setpriv", "mount", "pivot_root"):
            if shutil.which(tool) is None:
                return f"sdbox needs {tool!r} (util-linux) on PATH"
        if not os.access(SYSTEMD, os.X_OK):
            return f"sdbox needs systemd at {SYSTEMD}"
        if not (CGROUP2_ROOT / "cgroup.procs").exists():
            return f"sdbox needs a cgroup2 hierarchy at {CGROUP2_ROOT}"
        probe = CGROUP2_ROOT / f"sdbox-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            return f"sdbox needs a writable cgroup2 at {CGROUP2_ROOT}: {exc}"
        return None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> SdBox:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self, timeout: float = 60.0) -> SdBox:
        """Boot the box and wait until systemd reports running (or degraded); return self.

        On any failure the box is torn down before the error propagates.
        """
        if self._unshare is not None:
            raise BoxError("box is already up")
        reason = self.skip_reason()
        if reason:
            raise BoxError(reason)
        _remove_stale_leftovers()
        started = time.monotonic()
        try:
            self._boot(timeout)
        except BaseException:
            self.down()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _boot(self, timeout: float) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.cgroup.mkdir()
        spec = {
            "workdir": str(self.workdir),
            "cgroup": str(self.cgroup),
            "binds": [str(b) for b in self.binds],
        }
        with (self.workdir / "boot.log").open("wb") as log:
            # setpriv --pdeathsig: if the test process dies without calling down(), unshare
            # gets SIGKILL, and the box's PID 1 (which has the same arrangement with unshare)
            # follows, taking the whole box with it. (The signal comes when the *thread*
            # that started the box ends: boot it from the main thread.) Its own session
            # keeps a test run's Ctrl-C away from it.
            tie = ["setpriv", "--pdeathsig=KILL"] if self._die_with_parent else []
            self._unshare = subprocess.Popen(
                [
                    *tie,
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--net",
                    "--propagation=private",
                    sys.executable,
                    "-I",
                    __file__,
                    "_inner",
                    json.dumps(spec),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        self.pid = self._wait_for_pid1(deadline)
        state = ""
        while time.monotonic() < deadline:
            # The private bus socket appears a moment after exec; until then this fails.
            state = self.sh("systemctl", "is-system-running", check=False, timeout=10).stdout
            state = state.strip()
            if state in ("running", "degraded"):
                return
            self._check_alive()
            time.sleep(0.05)
        raise BoxError(f"box did not finish booting (state {state!r}){self._log_tail()}")

    def _wait_for_pid1(self, deadline: float) -> int:
        assert self._unshare is not None
        unshare_pid = self._unshare.pid
        # setpriv (if any) exec'ed unshare; unshare's only child is the box's PID 1, which execs its
        # way to systemd once the namespaces, mounts and cgroup are set up.
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text()
                child = int(children.split()[0]) if children.split() else None
                if child is not None and os.readlink(f"/proc/{child}/exe") == SYSTEMD:
                    return child
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise BoxError(f"systemd did not start in the box{self._log_tail()}")

    def _check_alive(self) -> None:
        if self._unshare is not None and self._unshare.poll() is not None:
            code = self._unshare.returncode
            raise BoxError(f"the box exited during boot (status {code}){self._log_tail()}")

    def _log_tail(self, lines: int = 40) -> str:
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / "boot.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- boot.log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def down(self, *, graceful: bool = False, timeout: float = 15.0) -> None:
        """Destroy the box: every process in it, its mounts, cgroups and work directory.

        Safe to call at any point, and twice. By default PID 1 is killed outright (the box
        is throw-away and a poweroff only costs time); ``graceful=True`` powers it off
        first, falling back to the kill.
        """
        proc = self._unshare
        if proc is not None:
            if graceful and self._is_box_pid1(self.pid):
                self.sh("systemctl", "poweroff", "--no-block", check=False, timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            if proc.poll() is None:
                # SIGKILL to a pid namespace's init kills every process in it; the kernel
                # then tears down its mounts. _is_box_pid1 makes sure the pid is still the
                # box's systemd (never ours, never the host's PID 1).
                if self._is_box_pid1(self.pid):
                    assert self.pid is not None
                    os.kill(self.pid, signal.SIGKILL)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    # PID 1 never came up (or is stuck in setup): unshare's death takes the
                    # child with it through its pdeathsig.
                    proc.kill()
                    proc.wait(timeout)
            self._unshare = None
        self.pid = None
        _remove_cgroup_tree(self.cgroup)
        if self.workdir is not None:
            _remove_workdir(self.workdir, keep_log=bool(os.environ.get("SDBOX_KEEP")))
            if self._workdir_given is None:
                self.workdir = None

    @staticmethod
    def _is_box_pid1(pid: int | None) -> bool:
        if pid is None or pid <= 1 or pid == os.getpid():
            return False
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            other_ns = os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        except OSError:
            return False
        return exe == SYSTEMD and other_ns

    # ----------------------------------------------------------------- using the box

    def sh(
        self,
        *cmd: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the box (all its namespaces, its root) and capture its output."""
        if self.pid is None:
            raise BoxError("box is not up")
        argv = ["nsenter", "-t", str(self.pid), "-a", *cmd]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=BOX_ENV,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise BoxCommandError(result.returncode, list(cmd), result.stdout, result.stderr)
        return result

    def path(self, inside: str | Path) -> Path:
        """The host path of a path in the box (through ``/proc/PID/root``)."""
        if self.pid is None:
            raise BoxError("box is not up")
        return Path(f"/proc/{self.pid}/root") / Path(inside).relative_to("/")

    def write(self, inside: str | Path, text: str, mode: int = 0o644) -> None:
        """Create or replace a file in the box (parents too), atomically, with ``mode``.

        Atomic because the daemon under test may read the file while it is written.
        """
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.sdbox-tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(target)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` of a few properties of ``unit``, as a dict."""
        out = self.sh("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *, since_cursor: str | None = None) -> str:
        """The unit's journal as plain messages (optionally after a cursor)."""
        if not since_cursor:
            return self.sh("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout
        # --cursor, dropping the cursor's own entry, not --after-cursor: before systemd 255,
        # --after-cursor with a match (-u) also drops the first matching entry
        # (systemd#30288), which lost a test's first line now and then.
        out = self.sh(
            "journalctl", "--no-pager", "-o", "json", "-u", unit, "--cursor", since_cursor
        ).stdout
        lines = []
        for raw in out.splitlines():
            entry = json.loads(raw)
            message = entry.get("MESSAGE")
            if entry.get("__CURSOR") != since_cursor and isinstance(message, str):
                lines.append(message)
        return "".join(f"{line}\n" for line in lines)

    def journal_cursor(self) -> str:
        """The current end of the journal, to read only what comes after it."""
        out = self.sh("journalctl", "--no-pager", "-n", "0", "--show-cursor").stdout
        return out.strip().rpartition("-- cursor: ")[2]


# --------------------------------------------------------------------- host-side cleanup


def _remove_cgroup_tree(root: Path, timeout: float = 5.0) -> None:
    # A cgroup can only be removed once empty, leaves first; the kernel releases a dead
    # box's cgroups a moment after its last process is reaped, hence the retries.
    if not root.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, root]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if not root.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _remove_stale_leftovers() -> None:
    """Remove the cgroups and work dirs of boxes whose test process was killed outright.

    Their processes are already gone (each box dies with the process that booted it); only
    the empty cgroups and directories stay behind. A box whose owner still lives belongs to
    a test session running now, and is left alone.
    """

    def dead(name: str) -> bool:
        owner = name.split("-")[1]
        return owner.isdigit() and not Path(f"/proc/{owner}").exists()

    for cg in CGROUP2_ROOT.glob("sdbox-*-*"):
        if dead(cg.name) and all(not p.read_text().strip() for p in cg.rglob("cgroup.procs")):
            _remove_cgroup_tree(cg, timeout=0)
    for workdir in Path(tempfile.gettempdir()).glob("sdbox-*-*-*"):
        if workdir.is_dir() and dead(workdir.name):
            _remove_workdir(workdir, keep_log=False)


def _remove_workdir(workdir: Path, *, keep_log: bool) -> None:
    # Remove only what the box created, and only directories that are not mount points:
    # never a recursive delete that could follow into a still-mounted overlay.
    for sub in ("ovl", "root"):
        d = workdir / sub
        if d.exists() and not os.path.ismount(d):
            with contextlib.suppress(OSError):
                d.rmdir()
    if keep_log:
        return
    (workdir / "boot.log").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()


# --------------------------------------------------------------------- inside the box


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _inner(spec: dict[str, object]) -> None:
    """PID 1 of the new namespaces, still on the host's root: build the box's root, then
    exec (through a cgroup namespace and pivot_root) into systemd."""
    workdir = Path(str(spec["workdir"]))
    cgroup = Path(str(spec["cgroup"]))
    binds = [Path(str(b)) for b in spec["binds"]]  # type: ignore[attr-defined]
    ovl, new = workdir / "ovl", workdir / "root"
    ovl.mkdir()
    new.mkdir()

    # All writes go to a tmpfs: the host's root is the overlay's read-only lower layer.
    _run("mount", "-t", "tmpfs", "-o", "mode=755", "sdbox-ovl", str(ovl))
    (ovl / "upper").mkdir()
    (ovl / "work").mkdir()
    lower = f"lowerdir=/,upperdir={ovl}/upper,workdir={ovl}/work"
    _run("mount", "-t", "overlay", "overlay", "-o", lower, str(new))

    # The API filesystems a container manager provides (systemd's container interface):
    # its own /proc with the dangerous bits read-only, a read-only /sys, a minimal /dev.
    _run("mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{new}/proc")
    for p in ("sys", "sysrq-trigger"):
        target = f"{new}/proc/{p}"
        if os.path.exists(target):
            _run("mount", "--bind", target, target)
            _run("mount", "-o", "remount,bind,ro", target)
    _run("mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", f"{new}/sys")
    _run("mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "dev", f"{new}/dev")
    for d in ("null", "zero", "full", "random", "urandom", "tty"):
        Path(f"{new}/dev/{d}").touch()
        _run("mount", "--bind", f"/dev/{d}", f"{new}/dev/{d}")
    for d in ("pts", "shm", "mqueue"):
        Path(f"{new}/dev/{d}").mkdir()
    _run(
        "mount",
        "-t",
        "devpts",
        "-o",
        "newinstance,ptmxmode=0666,mode=620",
        "devpts",
        f"{new}/dev/pts",
    )
    os.symlink("pts/ptmx", f"{new}/dev/ptmx")
    os.symlink("/proc/self/fd", f"{new}/dev/fd")
    _run("mount", "-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "tmpfs", f"{new}/run")
    _run("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", f"{new}/tmp")

    # The checkout, venv and interpreter at their own paths, read-only: the box must not
    # change the checkout, and a path under /tmp or on another filesystem would otherwise
    # be hidden (the overlay only shows the root filesystem, and /tmp is a fresh tmpfs).
    for src in binds:
        dst = Path(f"{new}{src}")
        dst.mkdir(parents=True, exist_ok=True)
        _run("mount", "--bind", str(src), str(dst))
        _run("mount", "-o", "remount,bind,ro", str(dst))

    units = new / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    (units / "ci.target").write_text(
        "[Unit]\nDescription=sdbox target\nRequires=basic.target\nAfter=basic.target\n"
        "AllowIsolate=yes\n"
    )
    for unit in MASKED_UNITS:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")

    # The box gets its own cgroup subtree (a leaf of it for PID 1, since processes may
    # only live in leaves), and, below, a cgroup namespace rooted there.
    (cgroup / "ctr").mkdir()
    (cgroup / "ctr" / "cgroup.procs").write_text(str(os.getpid()))

    final = (
        'set -eu; cd "$1"; mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 sys/fs/cgroup;'
        " mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot; cd /;"
        " exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin"
        f" setpriv --pdeathsig=KILL --bounding-set={CAPS} {SYSTEMD} --system --unit=ci.target"
    )
    sys.stdout.flush()
    os.execvp("unshare", ["unshare", "--cgroup", "--", "/bin/sh", "-c", final, "sh", str(new)])


# --------------------------------------------------------------------- by hand


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sdbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "sh", "down"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=Path("/tmp/sdbox"), help="state directory")
        if name == "sh":
            p.add_argument("cmd", nargs=argparse.REMAINDER)
    inner = sub.add_parser("_inner")
    inner.add_argument("spec")
    args = parser.parse_args(argv)

    if args.command == "_inner":
        _inner(json.loads(args.spec))
        return 1  # not reached: _inner execs
    state = args.dir / "sdbox.json"
    if args.command == "up":
        # This box outlives the command, so it must not die with it.
        box = SdBox(workdir=args.dir, die_with_parent=False)
        box.up()
        assert box._unshare is not None
        state.write_text(
            json.dumps({"pid": box.pid, "unshare": box._unshare.pid, "cgroup": str(box.cgroup)})
        )
        print(f"sdbox: systemd host-pid={box.pid} boot={box.boot_seconds:.2f}s")
        os._exit(0)
    saved = json.loads(state.read_text())
    if args.command == "sh":
        os.execvp("nsenter", ["nsenter", "-t", str(saved["pid"]), "-a", *args.cmd])
    if SdBox._is_box_pid1(saved["pid"]):
        os.kill(saved["pid"], signal.SIGKILL)
    time.sleep(0.5)
    _remove_cgroup_tree(Path(saved["cgroup"]))
    state.unlink()
    _remove_workdir(args.dir, keep_log=False)
    print("sdbox: down")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
