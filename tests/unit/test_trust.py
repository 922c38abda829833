"""taskd.trust: which files and folders the daemon may trust, and the fix each refusal names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from taskd.trust import TrustChecker, Untrusted


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp_path/a/f.py with the modes a umask 022 gives: trusted."""
    (tmp_path / "a").mkdir(mode=0o755)
    (tmp_path / "a" / "f.py").write_text("")
    (tmp_path / "a" / "f.py").chmod(0o644)
    return tmp_path


class TestTrustChecker:
    """Owner root or the daemon's user, no group/other write, on the path and above it."""

    def test_umask_022_tree_is_trusted(self, tree: Path) -> None:
        assert TrustChecker().path_problem(tree / "a" / "f.py", "plugin file") is None
        assert TrustChecker().path_problem(tree / "a", "plugin folder", folder=True) is None

    @pytest.mark.parametrize(("mode", "who"), [(0o664, "group"), (0o646, "others")])
    def test_writable_file(self, tree: Path, mode: int, who: str) -> None:
        f = tree / "a" / "f.py"
        f.chmod(mode)
        problem = TrustChecker().path_problem(f, "plugin file")
        assert problem is not None
        assert f"writable by {who}" in problem and problem.endswith(f"chmod go-w {f}")

    def test_writable_folder_above(self, tree: Path) -> None:
        (tree / "a").chmod(0o775)
        problem = TrustChecker().path_problem(tree / "a" / "f.py", "plugin file")
        assert problem is not None and problem.endswith(f"chmod go-w {tree / 'a'}")

    def test_sticky_folder_above_is_fine(self, tree: Path) -> None:
        (tree / "a").chmod(0o1777)  # like /tmp: others cannot move what is ours
        assert TrustChecker().path_problem(tree / "a" / "f.py", "plugin file") is None
        # ... but a sticky folder is no place for a plugin folder itself
        assert TrustChecker().path_problem(tree / "a", "plugin folder", folder=True)

    def test_another_users_file(self, tree: Path) -> None:
        f = tree / "a" / "f.py"
        st = f.stat()
        other = st.st_uid + 1 if st.st_uid else 65534
        problem = TrustChecker(euid=other + 1).path_problem(f, "plugin file")
        if st.st_uid == 0:  # owned by root: fine for any daemon user
            assert problem is None
        else:
            assert problem is not None and "chown" in problem

    def test_symlink_is_judged_by_its_target(self, tree: Path) -> None:
        (tree / "open").mkdir()
        (tree / "open").chmod(0o777)
        target = tree / "open" / "t.py"
        target.write_text("")
        target.chmod(0o644)
        link = tree / "a" / "l.py"
        link.symlink_to(target)
        problem = TrustChecker().path_problem(link, "plugin file")
        assert problem is not None
        assert f"{link} (which resolves to {target})" in problem
        assert problem.endswith(f"chmod go-w {tree / 'open'}")

    def test_not_a_folder(self, tree: Path) -> None:
        problem = TrustChecker().path_problem(tree / "a" / "f.py", "plugin folder", folder=True)
        assert problem is not None and "is not a folder" in problem

    def test_missing_raises(self, tree: Path) -> None:
        with pytest.raises(FileNotFoundError):
            TrustChecker().path_problem(tree / "nope", "config file")

    @pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
    def test_owned_by_nobody_as_root(self, tree: Path) -> None:
        f = tree / "a" / "f.py"
        os.chown(f, 65534, 65534)
        problem = TrustChecker().path_problem(f, "plugin file")
        assert problem is not None
        assert "owned by nobody, not by root" in problem and problem.endswith(f"chown root {f}")


class TestPathAsGiven:
    """The path as given is judged as well as the one it resolves to (review 8, finding 1)."""

    def test_dotdot_through_an_open_folder(self, tree: Path) -> None:
        """Every folder on the path as given is judged, as sshd's StrictModes do."""
        (tree / "open").mkdir()
        (tree / "open").chmod(0o777)
        problem = TrustChecker().path_problem(tree / "open" / ".." / "a" / "f.py", "plugin file")
        assert problem is not None and problem.endswith(f"chmod go-w {tree / 'open'}")
        assert "resolves to" not in problem and "symlink" not in problem  # there is none

    def test_link_in_an_open_folder_to_a_safe_file(self, tree: Path) -> None:
        (tree / "open").mkdir()
        (tree / "open").chmod(0o777)
        link = tree / "open" / "l.py"
        link.symlink_to(tree / "a" / "f.py")
        verdict = TrustChecker().judge(link, "plugin file")
        assert verdict.real == str(tree / "a" / "f.py") and verdict.via_link
        (problem,) = verdict.problems
        assert f"{link} (which resolves to {tree / 'a' / 'f.py'})" in problem.message
        assert problem.fixes == ("chmod go-w",) and problem.path == str(tree / "open")

    @pytest.mark.skipif(os.geteuid() != 0, reason="lchown to another user needs root")
    def test_link_of_another_user_in_a_sticky_folder(self, tree: Path) -> None:
        (tree / "shared").mkdir()
        (tree / "shared").chmod(0o1777)
        link = tree / "shared" / "l.py"
        link.symlink_to(tree / "a" / "f.py")
        assert TrustChecker().path_problem(link, "plugin file") is None  # root's own link
        os.lchown(link, 65534, 65534)
        problem = TrustChecker().path_problem(link, "plugin file")
        assert problem is not None and problem.endswith(f"chown -h root {link}")

    def test_link_loop(self, tree: Path) -> None:
        (tree / "x").symlink_to(tree / "y")
        (tree / "y").symlink_to(tree / "x")
        with pytest.raises(OSError, match="symbolic links"):
            TrustChecker().judge(tree / "x", "config file")

    def test_relative_link_with_dotdot(self, tree: Path) -> None:
        (tree / "b").mkdir()
        (tree / "b" / "l.py").symlink_to("../a/f.py")
        verdict = TrustChecker().judge(tree / "b" / "l.py", "plugin file")
        assert verdict.real == str(tree / "a" / "f.py") and not verdict.problems


class TestOpen:
    """What is opened is what was judged."""

    def test_reads_the_judged_file(self, tree: Path) -> None:
        (tree / "a" / "f.py").write_text("judged")
        trust = TrustChecker()
        fd = trust.open(trust.judge(tree / "a" / "f.py", "plugin file"))
        try:
            assert os.read(fd, 100) == b"judged"
        finally:
            os.close(fd)

    def test_a_file_swapped_after_the_check_is_refused(self, tree: Path) -> None:
        trust = TrustChecker()
        verdict = trust.judge(tree / "a" / "f.py", "plugin file")
        (tree / "a" / "new.py").write_text("swapped in")
        os.replace(tree / "a" / "new.py", tree / "a" / "f.py")
        with pytest.raises(Untrusted, match="changed while it was checked"):
            trust.open(verdict)

    def test_a_link_swapped_in_is_not_followed(self, tree: Path) -> None:
        trust = TrustChecker()
        verdict = trust.judge(tree / "a" / "f.py", "plugin file")
        (tree / "a" / "f.py").unlink()
        (tree / "a" / "f.py").symlink_to(tree / "a")
        with pytest.raises(OSError, match="symbolic links"):  # O_NOFOLLOW: ELOOP
            trust.open(verdict)

    def test_refused_verdict_is_not_opened(self, tree: Path) -> None:
        (tree / "a" / "f.py").chmod(0o666)
        trust = TrustChecker()
        with pytest.raises(Untrusted, match="chmod go-w"):
            trust.open(trust.judge(tree / "a" / "f.py", "plugin file"))


class TestNearestExisting:
    def test_sticky_folder_may_hold_a_new_state_dir(self, tree: Path) -> None:
        (tree / "tmpfs").mkdir()
        (tree / "tmpfs").chmod(0o1777)  # a fresh tmpfs mount
        assert TrustChecker().nearest_existing(tree / "tmpfs" / "x" / "state", "state_dir") == []

    def test_open_folder_above(self, tree: Path) -> None:
        (tree / "var").mkdir()
        (tree / "var").chmod(0o775)
        (problem,) = TrustChecker().nearest_existing(tree / "var" / "state", "state_dir")
        assert problem.path == str(tree / "var") and problem.fixes == ("chmod go-w",)
