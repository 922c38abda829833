"""Reading a config file: the bytes off disk and the TOML parse, each failure a ConfigError
naming the file. What the parsed document means is taskd.config.load's business.

The daemon's config is read only once its path and the file passed taskd.trust's checks,
and what is read is the file that was checked (open_config): whoever could change it would
decide which plugin folders root runs code from.

Every input is bounded, whatever its shape:

- only a regular file is read (opened with O_NONBLOCK, so a FIFO swapped in cannot hang a
  reload), of at most MAX_CONFIG_BYTES;
- the parse runs in a short-lived process of its own (taskd.config.parse_child) with the
  kernel's limits on its CPU time and address space and a wall-clock timeout here: tomllib's
  cost depends on the shape, not the size (one 39 KB dotted key took 10 s and 2.3 GB), and
  memory a parse took in this process would stay with the daemon after a rejected reload;
- its answer is read through a pipe of bounded size and unpickled with only the types a TOML
  document holds;
- the document nests at most MAX_DEPTH tables and arrays deep, job options included (they are
  handed to plugins as they are, and a reload compares them).

The daemon calls this from its loading thread (taskd.reload), never on the event loop."""

from __future__ import annotations

import datetime
import io
import os
import pickle
import re
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from taskd.config.lines import KeyLines
from taskd.errors import ConfigError, ConfigIssue
from taskd.trust import Problem, TrustChecker, Untrusted

DEFAULT_CONFIG = Path("/etc/taskd/taskd.toml")
MAX_CONFIG_BYTES = 1024 * 1024  # 10,000 jobs of a few keys each take about 380 KB
MAX_DEPTH = 32  # keys and indexes below the top: jobs.x.options.k is 4
PARSE_CPU_SECONDS = 10  # RLIMIT_CPU of the parser; a valid 1 MiB file takes under 1 s
PARSE_MEMORY = 512 * 1024 * 1024  # RLIMIT_AS of the parser; a valid 1 MiB file takes < 150 MB
PARSE_TIMEOUT = 30.0  # wall-clock seconds, for a loaded machine (the CPU limit is the bound)
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # the pickled document and key -> line map
_CHILD = Path(__file__).with_name("parse_child.py")
_SIMPLIFY = (
    "simplify it: TOML parsers are slow on some shapes (a dotted key of thousands of parts "
    "such as a.a.a..., thousands of nested or repeated tables)"
)


class _Failed(Exception):
    """The parser process ended without an answer; the message says why."""


class UntrustedConfig(ConfigError):
    """The config file may not be used (taskd.trust): whoever can change it, or a folder or
    link on its path, decides which plugin folders the daemon runs code from. ``problems``
    says why, each with its fix."""

    def __init__(self, file: Path, problems: tuple[Problem, ...]) -> None:
        super().__init__(ConfigIssue(str(file), "", f"refused: {p.message}") for p in problems)
        self.problems = problems


def open_config(file: Path) -> int:
    """The config file, opened for reading once its path and the file itself passed the
    trust checks; the open file is the one checked (taskd.trust). Raises ConfigError
    (UntrustedConfig when it is refused)."""
    trust = TrustChecker()
    try:
        verdict = trust.judge(file, "config file")
        # Said as what it is (a FIFO, a device: no config file at all), and never opened:
        # opening some devices has effects of their own.
        check_kind(file, verdict.st)
        if verdict.problems:
            raise UntrustedConfig(file, verdict.problems)
        return trust.open(verdict)
    except FileNotFoundError:
        raise _single(
            file, "config file not found; pass --config FILE or set TASKD_CONFIG"
        ) from None
    except Untrusted as exc:  # changed since it was judged
        raise UntrustedConfig(file, exc.problems) from None
    except OSError as exc:
        raise _single(file, f"cannot read config file: {exc.strerror or exc}") from None


def config_file(given: str | None) -> Path:
    """The config file: ``given`` (--config), else $TASKD_CONFIG, else DEFAULT_CONFIG."""
    return Path(given or os.environ.get("TASKD_CONFIG") or DEFAULT_CONFIG)


def start_parse(path: str | Path) -> Parse | ConfigError:
    """The file opened, checked and its parse started (see Parse), or why it could not be:
    the ConfigError is returned, for the caller to raise where it handles the others."""
    file = Path(path).expanduser().absolute()
    try:
        fd = open_config(file)
        try:
            return Parse(file, fd)
        finally:
            os.close(fd)  # the parser has its own
    except ConfigError as exc:
        return exc


def read_toml(path: Path) -> tuple[dict[str, Any], Mapping[str, int]]:
    """Parse a TOML file: the document and where each key sits (dotted path -> line). Every
    failure (missing, huge, binary, not TOML, too deep, a bound of the parser hit) becomes a
    ConfigError naming the file and what to do, never a traceback."""
    fd = _open(path)
    try:
        return read_open_toml(path, fd)
    finally:
        os.close(fd)


def read_open_toml(path: Path, fd: int) -> tuple[dict[str, Any], Mapping[str, int]]:
    """read_toml for a file the caller opened (open_config: the very file whose trust was
    checked); the parser reads this descriptor, and ``path`` only names it in messages.
    The caller closes ``fd``."""
    return Parse(path, fd).document()


class Parse:
    """A parse under way: the parser process started on a file the caller opened (it may
    close ``fd`` at once, the process has its own), its answer read by :meth:`document`.
    Started first, the parse runs on another core while the caller does other work:
    ``taskd run`` imports the daemon meanwhile. Raises ConfigError as read_open_toml does."""

    def __init__(self, path: Path, fd: int) -> None:
        check_kind(path, os.fstat(fd))
        self.path = path
        argv = [
            sys.executable,
            "-I",  # no PYTHON* variables, no user site, no script folder on sys.path
            "-S",  # no site-packages: the parser uses the standard library only
            str(_CHILD),
            *map(str, (MAX_CONFIG_BYTES, MAX_DEPTH, PARSE_CPU_SECONDS, PARSE_MEMORY)),
        ]
        try:
            self._proc = _spawn(argv, fd)
        except OSError as exc:
            raise _single(
                path, f"cannot start the config parser ({sys.executable}): {exc.strerror or exc}"
            ) from None
        self._deadline = time.monotonic() + PARSE_TIMEOUT
        # The text again, for the key -> line map a message may need (KeyLines scans it
        # then): pread leaves the offset the parser reads from alone. Bounded like the parse.
        try:
            self._raw = os.pread(fd, MAX_CONFIG_BYTES, 0)
        except OSError:
            self._raw = b""  # messages name keys without lines; the parse says what is wrong

    def document(self) -> tuple[dict[str, Any], Mapping[str, int]]:
        """The document and its key -> line map, once the parser answered."""
        answer = _answer(self.path, self._proc, self._deadline)
        if answer[0] == "ok":
            raw, self._raw = self._raw, b""
            return answer[1], KeyLines(raw)
        _refuse(self.path, *answer[1:])


def _open(path: Path) -> int:
    """The config file, opened for reading: a regular file of at most MAX_CONFIG_BYTES."""
    try:
        # Checked before opening too: opening some devices has effects of its own.
        check_kind(path, os.stat(path))
        # O_NONBLOCK: a FIFO swapped in after the stat cannot make the open wait for a
        # writer; O_NOCTTY: a terminal cannot become ours. The opened file is checked again.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _single(
            path, "config file not found; pass --config FILE or set TASKD_CONFIG"
        ) from None
    except OSError as exc:
        raise _single(path, f"cannot read config file: {exc.strerror or exc}") from None
    try:
        check_kind(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_kind(path: Path, st: os.stat_result) -> None:
    """Refuse (ConfigError) anything but a regular file of at most MAX_CONFIG_BYTES."""
    if stat.S_ISDIR(st.st_mode):
        raise _single(path, "is a directory, not a config file")
    if not stat.S_ISREG(st.st_mode):
        raise _single(
            path, "is not a regular file (a device, FIFO or socket); a config file is TOML text"
        )
    if st.st_size > MAX_CONFIG_BYTES:
        raise _single(path, _too_big(st.st_size))


def _too_big(size: int | None) -> str:
    what = f"is {size} bytes" if size is not None else "grew while it was read"
    return f"config file {what}; the limit is {MAX_CONFIG_BYTES} bytes (1 MiB): is this the right file?"


def _answer(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> tuple[Any, ...]:
    """The parser process's answer (``proc``, see _spawn), read by ``deadline``."""
    try:
        out, code, err = _collect(proc, deadline)
    except _Failed as exc:
        raise _single(path, str(exc)) from None
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and not out):
        raise _single(
            path,
            f"parsing took more than {PARSE_CPU_SECONDS} s of CPU time, the limit for a config "
            f"file; {_SIMPLIFY}",
        )
    try:
        answer = _Unpickler(io.BytesIO(out)).load()
        if not isinstance(answer, tuple) or answer[0] not in ("ok", "error"):
            raise ValueError(f"unexpected answer {type(answer).__name__}")
    except Exception as exc:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [repr(exc)]
        raise _single(
            path, f"the config parser failed (exit {code}): {tail[0][:300]}; please report this"
        ) from None
    return answer


def _spawn(argv: list[str], stdin: int) -> subprocess.Popen[bytes]:
    """Start the parser on the open file ``stdin``."""
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={},
        # Its own session: a signal to the daemon's process group (systemctl kill, a
        # shell's job control) must not kill the parse of the reload it asked for.
        start_new_session=True,
    )


def _collect(proc: subprocess.Popen[bytes], deadline: float) -> tuple[bytes, int, bytes]:
    """The parser's (stdout, exit code, the tail of stderr). Raises _Failed when it is not
    done by ``deadline`` (PARSE_TIMEOUT after its start) or answers more than
    MAX_ANSWER_BYTES."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Failed(
                        f"parsing did not finish within {PARSE_TIMEOUT:g} s, the limit for a "
                        f"config file; {_SIMPLIFY}, or retry when the machine is less busy"
                    )
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 256 * 1024)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    key.data.extend(chunk)
                    if len(out) > MAX_ANSWER_BYTES:
                        raise _Failed(
                            f"the parsed config is over {MAX_ANSWER_BYTES} bytes, the limit "
                            f"for a config file; {_SIMPLIFY}"
                        )
                    if len(err) > 8192:  # only its last line is shown
                        del err[:-4096]
        code = proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise _Failed(f"the config parser did not exit within {PARSE_TIMEOUT:g} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(out), code, bytes(err)


class _Unpickler(pickle.Unpickler):
    """Only what a TOML document holds: the builtins pickle needs no class for, and dates."""

    _ALLOWED = frozenset({"datetime", "date", "time", "timezone", "timedelta"})

    def find_class(self, module: str, name: str) -> Any:
        if module == "datetime" and name in self._ALLOWED:
            return getattr(datetime, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a TOML document")


def _refuse(path: Path, kind: str, detail: str, line: int | None, number: int | None) -> NoReturn:
    """Raise the ConfigError for the parser's ``kind`` of refusal."""
    if kind == "toml":
        match = re.search(r"\(at line (\d+), column (\d+)\)", detail)
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", detail)
        col = f" at column {match.group(2)}" if match else ""
        raise ConfigError(
            [
                ConfigIssue(
                    str(path),
                    "",
                    f"not valid TOML: {message}{col}",
                    int(match.group(1)) if match else None,
                )
            ]
        )
    if kind == "depth":
        raise ConfigError(
            [
                ConfigIssue(
                    str(path),
                    detail,
                    f"nested {number} levels deep (keys and array indexes from the top of the "
                    f"file); the limit is {MAX_DEPTH}",
                    line,
                    "flatten it; a job's options reach its plugin as they are written",
                )
            ]
        )
    messages = {
        "size": _too_big(None),
        "encoding": f"{detail}; a config file is TOML text",
        "nul": f"{detail}; a config file is TOML text",
        "recursion": (
            f"arrays or inline tables nested deeper than the TOML parser follows; "
            f"the limit is {MAX_DEPTH} levels: flatten them"
        ),
        "memory": (
            f"parsing needs more than {PARSE_MEMORY >> 20} MiB of memory, the limit for a "
            f"config file; {_SIMPLIFY}"
        ),
        "parser": f"the TOML parser failed on this file ({detail}); is it TOML?",
    }
    raise _single(path, messages.get(kind, f"the config parser refused it: {kind} {detail}"))


def _single(path: Path, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(str(path), "", message)])
