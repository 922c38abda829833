"""Bundled taskd plugin: ``checksum``, hash files in the process pool; write or verify a manifest.

A drop-in file: the daemon loads it by path. The job is ``kind="cpu"``: hashing big files is
CPU-bound, so it runs in a worker process. That is why everything the job touches is
module-level and picklable, and why it raises only builtin exception types: an exception
crosses back to the daemon by pickle, and a class defined here could only be unpickled where
this file is loaded under the same module name.
"""

import contextlib
import glob
import hashlib
import os
import stat
import tempfile
import time
from typing import Any, Literal

import taskd

# hashlib.algorithms_guaranteed minus shake_128/shake_256, whose digests have no fixed length
# (sha256sum-style manifests cannot say which length was meant). A Literal, so the daemon
# rejects a typo when the config loads rather than at the first run.
Algorithm = Literal[
    "blake2b",
    "blake2s",
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha3_224",
    "sha3_256",
    "sha3_384",
    "sha3_512",
    "sha512",
]
ALGORITHMS = frozenset(hashlib.algorithms_guaranteed - {"shake_128", "shake_256"})

CHUNK = 1024 * 1024
# Python 3.11+: hashlib.file_digest reads into a reusable buffer and hashes in C with the GIL
# released; the fallback below does the same with a 1 MiB buffer from Python.
_HAVE_FILE_DIGEST = hasattr(hashlib, "file_digest")
# How many mismatched or missing files an error message names before "... and N more".
_MAX_NAMED = 20
_GLOB_CHARS = frozenset("*?[")


def _digest_file(path: str, algorithm: str) -> str:
    with open(path, "rb") as f:
        if _HAVE_FILE_DIGEST:
            return hashlib.file_digest(f, algorithm).hexdigest()
        h = hashlib.new(algorithm)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
        return h.hexdigest()


def _is_regular(path: str) -> bool:
    """True for a regular file (following symlinks). FIFOs and devices are not hashed: opening a
    FIFO blocks until someone writes to it, which would hang the job."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # dangling symlink, vanished meanwhile
        return False


def _raise(exc: OSError) -> None:
    raise exc


def _collect(paths: list[str], exclude: set[str]) -> tuple[list[str], int]:
    """Expand files, directories (walked recursively) and glob patterns into absolute paths.

    Returns the sorted files and how many non-regular entries were skipped.
    """
    found: set[str] = set()
    skipped = 0
    problems: list[str] = []
    for entry in paths:
        if _GLOB_CHARS & set(entry):
            matches = glob.glob(entry, recursive=True)
            if not matches:
                problems.append(f"{entry!r} matched nothing")
        elif os.path.lexists(entry):
            matches = [entry]
        else:
            problems.append(f"{entry!r} does not exist")
            continue
        for match in matches:
            if os.path.isdir(match):
                # followlinks=False: a symlinked directory could loop or lead anywhere. onerror:
                # os.walk would otherwise skip an unreadable folder without a word.
                for root, _dirs, files in os.walk(match, onerror=_raise):
                    for name in files:
                        candidate = os.path.join(root, name)
                        if _is_regular(candidate):
                            found.add(os.path.abspath(candidate))
                        else:
                            skipped += 1
            elif _is_regular(match):
                found.add(os.path.abspath(match))
            elif match == entry:
                problems.append(f"{entry!r} is not a regular file")
            else:
                skipped += 1
    if problems:
        raise FileNotFoundError("checksum: option 'paths': " + "; ".join(problems))
    return sorted(found - exclude), skipped


# GNU sha256sum escapes a file name holding a backslash or newline and marks the line with a
# leading backslash; do the same so any name round-trips.
def _escape(name: str) -> tuple[str, bool]:
    if "\\" not in name and "\n" not in name and "\r" not in name:
        return name, False
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"), True


def _unescape(name: str) -> str:
    out: list[str] = []
    chars = iter(name)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
        else:
            out.append(c)
    return "".join(out)


def _read_manifest(manifest: str, algorithm: str) -> dict[str, str]:
    """Parse a sha256sum-style manifest into {absolute path: hex digest}.

    Relative names are resolved against the manifest's folder, so a folder and its manifest
    can be moved together.
    """
    base = os.path.dirname(os.path.abspath(manifest))
    size = hashlib.new(algorithm).digest_size * 2
    entries: dict[str, str] = {}
    try:
        with open(manifest, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checksum: manifest {manifest!r} (option 'verify') does not exist"
        ) from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        digest, sep, name = line.partition(" ")
        # "<hex>  <name>" (text mode) or "<hex> *<name>" (binary mode): same bytes on POSIX.
        if not sep or name[:1] not in (" ", "*") or len(name) < 2:
            raise ValueError(
                f"checksum: {manifest}:{lineno}: not a '<hex>  <path>' line: {raw[:80]!r}"
            )
        name = name[1:]
        if escaped:
            name = _unescape(name)
        if len(digest) != size or not all(c in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError(
                f"checksum: {manifest}:{lineno}: {digest[:80]!r} is not a {algorithm} digest "
                f"({size} hex digits); is option 'algorithm' the one the manifest was made with?"
            )
        entries[os.path.normpath(os.path.join(base, name))] = digest.lower()
    return entries


def _write_manifest(manifest: str, digests: dict[str, str]) -> None:
    """Write atomically: a temp file in the same folder, fsync, then os.replace, so a reader (or
    a crash) sees the old manifest or the new one, never half of one."""
    target = os.path.abspath(manifest)
    folder = os.path.dirname(target)
    lines: list[str] = []
    for path in sorted(digests):
        # Relative to the manifest when inside its folder, for the same reason _read_manifest
        # resolves them against it; absolute otherwise.
        rel = os.path.relpath(path, folder)
        name = path if rel.startswith(os.pardir) else rel
        name, escaped = _escape(name)
        lines.append(("\\" if escaped else "") + f"{digests[path]}  {name}\n")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checksum-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; keep the old manifest's mode, else a readable 0644.
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every filesystem lets a folder be fsynced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" ... and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else "")


def checksum(
    paths: list[str] | None = None,
    algorithm: Algorithm = "sha256",
    verify: str | None = None,
    write_manifest: str | None = None,
    list_limit: int = 100,
) -> dict[str, Any]:
    """Hash files in a worker process; optionally verify them against a manifest or write one.

    Options:
      paths: files, folders (hashed recursively) and glob patterns ("**" recurses); an entry
        that does not exist or a pattern that matches nothing is an error. May be left out
        when verify is given: then the files the manifest lists are checked.
      algorithm: a hashlib.algorithms_guaranteed name except shake_* (default "sha256").
      verify: a manifest in sha256sum format ("<hex>  <path>", relative paths resolved against
        the manifest's folder); the run fails naming every mismatched and missing file.
      write_manifest: write the digests there in the same format (atomically), only after a
        verification, if any, passed.
      list_limit: return per-file digests when at most this many files (default 100); above it,
        only the summary digest.

    Returns files, bytes, seconds, algorithm, a summary digest over all (path, digest) pairs,
    and digests (per file) or, when verifying, how many files matched and which were unlisted.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"checksum: option 'algorithm' must be one of {', '.join(sorted(ALGORITHMS))}, "
            f"got {algorithm!r}"
        )
    if not paths and verify is None:
        raise ValueError("checksum: give option 'paths', option 'verify', or both")
    if list_limit < 0:
        raise ValueError(f"checksum: option 'list_limit' must be >= 0, got {list_limit}")
    if (
        verify is not None
        and write_manifest is not None
        and os.path.realpath(verify) == os.path.realpath(write_manifest)
    ):
        # Rewriting the reference on every run would make the next verification pass vacuously.
        raise ValueError(
            "checksum: options 'verify' and 'write_manifest' name the same file; "
            "the manifest being verified against must not be overwritten"
        )

    start = time.perf_counter()
    # Neither manifest is part of the data it describes.
    exclude = {os.path.abspath(m) for m in (verify, write_manifest) if m is not None}
    files, skipped = _collect(paths or [], exclude)
    expected = _read_manifest(verify, algorithm) if verify is not None else {}

    digests: dict[str, str] = {}
    total_bytes = 0
    missing: list[str] = []
    for path in sorted(set(files) | set(expected)):
        try:
            size = os.stat(path).st_size
            digests[path] = _digest_file(path, algorithm)
        except FileNotFoundError:
            if path not in expected:
                raise  # found by the walk a moment ago, then deleted: worth a retry
            missing.append(path)
            continue
        total_bytes += size

    result: dict[str, Any] = {
        "files": len(digests),
        "bytes": total_bytes,
        "algorithm": algorithm,
    }
    if skipped:
        result["skipped_not_regular"] = skipped
    if verify is not None:
        mismatched = [
            f"{p} (expected {expected[p][:12]}..., got {digests[p][:12]}...)"
            for p in sorted(expected)
            if p in digests and digests[p] != expected[p]
        ]
        if mismatched or missing:
            parts = []
            if mismatched:
                parts.append(f"{len(mismatched)} mismatched: {_named(mismatched)}")
            if missing:
                parts.append(f"{len(missing)} missing: {_named(missing)}")
            raise RuntimeError(
                f"checksum: verification against {verify} failed: " + "; ".join(parts)
            )
        unlisted = sorted(set(digests) - set(expected))
        result["verified"] = len(expected)
        result["unlisted"] = len(unlisted)
        if unlisted:
            result["unlisted_sample"] = unlisted[:_MAX_NAMED]

    if write_manifest is not None:
        _write_manifest(write_manifest, digests)
        result["manifest"] = os.path.abspath(write_manifest)

    # One digest that changes when any file's name or content does: cheap to compare and store
    # in history when the per-file list is too long to keep.
    summary = hashlib.new(algorithm)
    for path in sorted(digests):
        summary.update(f"{digests[path]}  {path}\n".encode("utf-8", "surrogateescape"))
    result["summary_digest"] = summary.hexdigest()
    if len(digests) <= list_limit:
        result["digests"] = digests
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [taskd.JobType("checksum", checksum, kind="cpu")]
