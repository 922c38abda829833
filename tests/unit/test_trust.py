"""taskd.trust: which files and folders the daemon may trust, and the fix each refusal names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from taskd.trust import TrustChecker


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
        assert f"{link} (a symlink to {target})" in problem
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
