"""The bundled checksum plugin: digests of real files, manifests, and runs in real process pools."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import types
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import get_args

import pytest

import taskd

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "checksum.py"
# The name conftest's load_plugin registers the file under.
MODULE = "_taskd_dropin_checksum_test"

# Known answers: FIPS 180-2 and RFC 1321 test vectors for b"abc".
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
ABC_MD5 = "900150983cd24fb0d6963f7d28e17f72"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.fixture
def ck(load_plugin: Callable[[str], types.ModuleType]) -> types.ModuleType:
    return load_plugin("checksum")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """data/abc.txt, data/empty, data/sub/big.bin (3 MiB + 1 byte: several 1 MiB chunks)."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "abc.txt").write_bytes(b"abc")
    (data / "empty").write_bytes(b"")
    (data / "sub" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 1))
    return data


class TestRegistration:
    """The hook offers one cpu job type whose function pickles by reference."""

    def test_job_type(
        self,
        ck: types.ModuleType,
        job_types: Callable[[types.ModuleType], list[taskd.JobType]],
        options_contract: Callable[[taskd.JobType], None],
    ) -> None:
        (job,) = job_types(ck)
        assert (job.name, job.kind, job.func) == ("checksum", "cpu", ck.checksum)
        options_contract(job)
        assert pickle.loads(pickle.dumps(job.func)) is ck.checksum

    def test_algorithm_literal_matches_hashlib(self, ck: types.ModuleType) -> None:
        assert set(get_args(ck.Algorithm)) == ck.ALGORITHMS
        fixed_length = hashlib.algorithms_guaranteed - {"shake_128", "shake_256"}
        assert fixed_length == ck.ALGORITHMS


class TestDigests:
    """Digests are the known answers, whichever way the files are named."""

    def test_known_answers(self, ck: types.ModuleType, tree: Path) -> None:
        result = ck.checksum(paths=[str(tree / "abc.txt"), str(tree / "empty")])
        assert result["digests"] == {
            str(tree / "abc.txt"): ABC_SHA256,
            str(tree / "empty"): EMPTY_SHA256,
        }
        assert (result["files"], result["bytes"], result["algorithm"]) == (2, 3, "sha256")
        assert json.loads(json.dumps(result)) == result

    def test_other_algorithm(self, ck: types.ModuleType, tree: Path) -> None:
        result = ck.checksum(paths=[str(tree / "abc.txt")], algorithm="md5")
        assert result["digests"] == {str(tree / "abc.txt"): ABC_MD5}

    @pytest.mark.parametrize("file_digest", [True, False], ids=["file_digest", "chunked"])
    def test_multi_chunk_file(
        self,
        ck: types.ModuleType,
        tree: Path,
        monkeypatch: pytest.MonkeyPatch,
        file_digest: bool,
    ) -> None:
        # Both readers: hashlib.file_digest (3.11+) and the 1 MiB-chunk loop used before it.
        monkeypatch.setattr(ck, "_HAVE_FILE_DIGEST", file_digest)
        big = tree / "sub" / "big.bin"
        result = ck.checksum(paths=[str(big)])
        assert result["digests"][str(big)] == hashlib.sha256(big.read_bytes()).hexdigest()

    def test_folder_is_walked(self, ck: types.ModuleType, tree: Path) -> None:
        result = ck.checksum(paths=[str(tree)])
        assert sorted(result["digests"]) == sorted(
            str(tree / p) for p in ("abc.txt", "empty", "sub/big.bin")
        )
        assert result["bytes"] == 3 + 3 * 1024 * 1024 + 1

    def test_glob_patterns(self, ck: types.ModuleType, tree: Path) -> None:
        result = ck.checksum(paths=[str(tree / "**" / "*.bin"), str(tree / "*.txt")])
        assert sorted(result["digests"]) == [str(tree / "abc.txt"), str(tree / "sub" / "big.bin")]

    def test_same_file_twice_is_hashed_once(self, ck: types.ModuleType, tree: Path) -> None:
        result = ck.checksum(paths=[str(tree / "abc.txt"), str(tree / "*.txt")])
        assert result["files"] == 1

    def test_fifo_in_a_folder_is_skipped_not_opened(self, ck: types.ModuleType, tree: Path) -> None:
        # Opening a FIFO would block until someone writes: the run would hang.
        os.mkfifo(tree / "pipe")
        result = ck.checksum(paths=[str(tree)])
        assert result["files"] == 3
        assert result["skipped_not_regular"] == 1

    def test_summary_instead_of_digests_past_list_limit(
        self, ck: types.ModuleType, tree: Path
    ) -> None:
        full = ck.checksum(paths=[str(tree)])
        short = ck.checksum(paths=[str(tree)], list_limit=2)
        assert "digests" not in short
        assert short["files"] == 3
        assert short["summary_digest"] == full["summary_digest"]
        (tree / "empty").write_bytes(b"x")
        assert (
            ck.checksum(paths=[str(tree)], list_limit=2)["summary_digest"] != full["summary_digest"]
        )


class TestManifest:
    """write_manifest writes sha256sum's format atomically; verify names every difference."""

    def test_written_in_sha256sum_format(self, ck: types.ModuleType, tree: Path) -> None:
        manifest = tree / "SHA256SUMS"
        result = ck.checksum(paths=[str(tree)], write_manifest=str(manifest))
        big = hashlib.sha256((tree / "sub" / "big.bin").read_bytes()).hexdigest()
        assert manifest.read_text() == (
            f"{ABC_SHA256}  abc.txt\n{EMPTY_SHA256}  empty\n{big}  sub/big.bin\n"
        )
        assert result["manifest"] == str(manifest)
        assert result["files"] == 3  # the manifest does not describe itself
        assert oct(manifest.stat().st_mode & 0o777) == oct(0o644)
        assert [p.name for p in tree.iterdir() if p.name.startswith(".checksum-")] == []

    def test_outside_files_are_absolute(
        self, ck: types.ModuleType, tree: Path, tmp_path: Path
    ) -> None:
        manifest = tmp_path / "sums" / "SHA256SUMS"
        manifest.parent.mkdir()
        ck.checksum(paths=[str(tree / "abc.txt")], write_manifest=str(manifest))
        assert manifest.read_text() == f"{ABC_SHA256}  {tree / 'abc.txt'}\n"

    def test_odd_names_round_trip(self, ck: types.ModuleType, tmp_path: Path) -> None:
        odd = tmp_path / "new\nline\\back"
        odd.write_bytes(b"abc")
        manifest = tmp_path / "SUMS"
        ck.checksum(paths=[str(odd)], write_manifest=str(manifest))
        # GNU's escaping: a leading backslash marks the line, \n and \\ inside the name.
        assert manifest.read_text() == f"\\{ABC_SHA256}  new\\nline\\\\back\n"
        assert ck.checksum(verify=str(manifest))["verified"] == 1

    def test_replaces_the_old_manifest_keeping_its_mode(
        self, ck: types.ModuleType, tree: Path
    ) -> None:
        manifest = tree / "SHA256SUMS"
        manifest.write_text("stale\n")
        manifest.chmod(0o600)
        ck.checksum(paths=[str(tree / "abc.txt")], write_manifest=str(manifest))
        assert manifest.read_text() == f"{ABC_SHA256}  abc.txt\n"
        assert manifest.stat().st_mode & 0o777 == 0o600

    def test_verify_passes_on_unchanged_files(self, ck: types.ModuleType, tree: Path) -> None:
        manifest = tree / "SHA256SUMS"
        ck.checksum(paths=[str(tree)], write_manifest=str(manifest))
        result = ck.checksum(verify=str(manifest))
        assert (result["verified"], result["files"], result["unlisted"]) == (3, 3, 0)

    def test_verify_reads_coreutils_output(self, ck: types.ModuleType, tree: Path) -> None:
        # "*" marks binary mode in sha256sum's format; the bytes hashed are the same.
        (tree / "SUMS").write_text(f"{ABC_SHA256.upper()} *abc.txt\n\n{EMPTY_SHA256}  empty\n")
        assert ck.checksum(verify=str(tree / "SUMS"))["verified"] == 2

    def test_verify_names_every_mismatch_and_missing_file(
        self, ck: types.ModuleType, tree: Path
    ) -> None:
        manifest = tree / "SHA256SUMS"
        ck.checksum(paths=[str(tree)], write_manifest=str(manifest))
        (tree / "abc.txt").write_bytes(b"abd")
        (tree / "empty").write_bytes(b"!")
        (tree / "sub" / "big.bin").unlink()
        with pytest.raises(RuntimeError, match="verification against") as info:
            ck.checksum(verify=str(manifest))
        message = str(info.value)
        assert "2 mismatched" in message
        assert f"{tree / 'abc.txt'} (expected {ABC_SHA256[:12]}..." in message
        assert str(tree / "empty") in message
        assert f"1 missing: {tree / 'sub' / 'big.bin'}" in message

    def test_verify_with_paths_reports_unlisted_files(
        self, ck: types.ModuleType, tree: Path
    ) -> None:
        manifest = tree / "SHA256SUMS"
        ck.checksum(paths=[str(tree / "abc.txt")], write_manifest=str(manifest))
        result = ck.checksum(paths=[str(tree)], verify=str(manifest))
        assert (result["verified"], result["unlisted"]) == (1, 2)
        assert result["unlisted_sample"] == [str(tree / "empty"), str(tree / "sub" / "big.bin")]

    def test_failed_verification_writes_no_manifest(self, ck: types.ModuleType, tree: Path) -> None:
        reference, new = tree / "REF", tree / "NEW"
        ck.checksum(paths=[str(tree / "abc.txt")], write_manifest=str(reference))
        (tree / "abc.txt").write_bytes(b"changed")
        with pytest.raises(RuntimeError):
            ck.checksum(verify=str(reference), write_manifest=str(new))
        assert not new.exists()

    def test_verify_and_write_the_same_file_is_refused(
        self, ck: types.ModuleType, tree: Path
    ) -> None:
        with pytest.raises(ValueError, match="same file"):
            ck.checksum(paths=[str(tree)], verify=str(tree / "S"), write_manifest=str(tree / "S"))

    def test_malformed_manifest_line(self, ck: types.ModuleType, tree: Path) -> None:
        (tree / "SUMS").write_text(f"{ABC_SHA256}  abc.txt\nnot a line\n")
        with pytest.raises(ValueError, match=r"SUMS:2: not a '<hex>  <path>' line"):
            ck.checksum(verify=str(tree / "SUMS"))

    def test_digest_of_another_algorithm(self, ck: types.ModuleType, tree: Path) -> None:
        (tree / "SUMS").write_text(f"{ABC_MD5}  abc.txt\n")
        with pytest.raises(ValueError, match=r"SUMS:1: .* is not a sha256 digest"):
            ck.checksum(verify=str(tree / "SUMS"))


class TestBadOptions:
    """Bad options fail before any hashing, naming the option."""

    def test_missing_path_and_empty_pattern_are_both_named(
        self, ck: types.ModuleType, tree: Path
    ) -> None:
        with pytest.raises(FileNotFoundError, match="'paths'") as info:
            ck.checksum(paths=[str(tree / "nope"), str(tree / "*.none")])
        assert "nope' does not exist" in str(info.value)
        assert "*.none' matched nothing" in str(info.value)

    def test_unknown_algorithm(self, ck: types.ModuleType, tree: Path) -> None:
        with pytest.raises(ValueError, match="'algorithm' must be one of"):
            ck.checksum(paths=[str(tree)], algorithm="shake_128")

    def test_nothing_to_do(self, ck: types.ModuleType) -> None:
        with pytest.raises(ValueError, match="'paths', option 'verify'"):
            ck.checksum()

    def test_missing_manifest(self, ck: types.ModuleType, tree: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"manifest .* does not exist"):
            ck.checksum(verify=str(tree / "nope"))


# What the daemon's worker must do before it can unpickle a drop-in's function: load the file
# by path under the name the parent used. Source code for exec, so that this initializer
# itself needs nothing importable in a fresh interpreter.
_LOAD_IN_WORKER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location({name!r}, {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
"""


def _loader_source() -> str:
    return _LOAD_IN_WORKER.format(name=MODULE, path=str(PLUGIN))


@pytest.mark.timeout(60)
class TestProcessPool:
    """The job runs in real worker processes; which start methods need the file loaded there."""

    # Python 3.12+ warns when forking a process that has threads (earlier async tests leave
    # the default executor's); the worker here runs one pure function, so that is safe.
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_fork_after_loading(self, ck: types.ModuleType, tree: Path) -> None:
        # A forked worker inherits sys.modules, synthetic drop-in module included.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            result = pool.submit(ck.checksum, paths=[str(tree / "abc.txt")]).result()
            failure = pool.submit(ck.checksum, paths=[str(tree / "nope")]).exception()
        assert result["digests"] == {str(tree / "abc.txt"): ABC_SHA256}
        # Errors come back as builtin types, unpicklable-class trouble aside.
        assert type(failure) is FileNotFoundError
        assert "does not exist" in str(failure)

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_fork_before_loading_breaks_the_pool(
        self, load_plugin: Callable[[str], types.ModuleType], tree: Path
    ) -> None:
        # Workers forked before the drop-in was loaded (a daemon pool started before a reload
        # added it) cannot unpickle its function: the worker dies, and the whole pool with it.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            assert pool.submit(os.getpid).result() != os.getpid()
            ck = load_plugin("checksum")
            with pytest.raises(BrokenProcessPool):
                pool.submit(ck.checksum, paths=[str(tree / "abc.txt")]).result()

    @pytest.mark.parametrize("method", ["spawn", "forkserver"])
    def test_fresh_interpreter_without_loading_breaks_the_pool(
        self, ck: types.ModuleType, tree: Path, method: str
    ) -> None:
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(1, mp_context=ctx) as pool, pytest.raises(BrokenProcessPool):
            pool.submit(ck.checksum, paths=[str(tree / "abc.txt")]).result()

    @pytest.mark.parametrize("method", ["spawn", "forkserver"])
    def test_fresh_interpreter_loading_by_path(
        self, ck: types.ModuleType, tree: Path, method: str
    ) -> None:
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(
            1, mp_context=ctx, initializer=exec, initargs=(_loader_source(),)
        ) as pool:
            result = pool.submit(ck.checksum, paths=[str(tree)]).result()
        assert ck.__name__ == MODULE
        assert result["files"] == 3
        assert result["digests"][str(tree / "abc.txt")] == ABC_SHA256
