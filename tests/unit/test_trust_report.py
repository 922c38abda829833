"""taskd.trust_report: one command offered for several problems with the same fix."""

from __future__ import annotations

import os
from pathlib import Path

from taskd.trust import Problem
from taskd.trust_report import combined_hints


def chmod(path: Path) -> Problem:
    return Problem(
        f"{path} is writable: chmod go-w {path}", str(path), ("chmod go-w",), os.getuid()
    )


class TestCombinedHints:
    def test_several_under_one_folder(self, tmp_path: Path) -> None:
        (tmp_path / "a").mkdir()
        problems = [chmod(tmp_path / "a"), chmod(tmp_path / "a" / "f"), chmod(tmp_path / "b")]
        assert combined_hints(problems) == [
            f"chmod -R go-w {tmp_path} fixes all 3 of these at once"
        ]

    def test_counts_only_those_it_fixes(self, tmp_path: Path) -> None:
        other = Problem("x is owned by nobody: chown root x", "/x", ("chown root",), 65534)
        problems = [chmod(tmp_path / "a"), chmod(tmp_path / "b"), other]
        assert combined_hints(problems) == [f"chmod -R go-w {tmp_path} fixes 2 of these at once"]

    def test_one_problem_needs_no_hint(self, tmp_path: Path) -> None:
        assert combined_hints([chmod(tmp_path / "a")]) == []

    def test_never_the_root_nor_a_sticky_folder(self, tmp_path: Path) -> None:
        assert combined_hints([chmod(Path("/etc/x")), chmod(Path("/var/y"))]) == []
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared").chmod(0o1777)
        problems = [chmod(tmp_path / "shared" / "a"), chmod(tmp_path / "shared" / "b")]
        assert combined_hints(problems) == []

    def test_not_a_folder_of_another_owner(self, tmp_path: Path) -> None:
        """The paths belong to several users: a -R on the folder above would reach others'."""
        a = chmod(tmp_path / "a")
        b = Problem("b", str(tmp_path / "b"), ("chmod go-w",), a.owner + 1)
        assert combined_hints([a, b]) == []

    def test_chown_of_a_link_is_not_combined(self, tmp_path: Path) -> None:
        links = [Problem("l", str(tmp_path / n), ("chown -h root",), 65534) for n in ("l1", "l2")]
        assert combined_hints(links) == []
