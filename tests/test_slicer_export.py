"""scripts/export_slicer_extension.sh: never deletes what it did not write (issue 28, packaging).

Each test runs the real script on folders in a temp dir: a new folder, the project's parent (what
``scripts/export_slicer_extension.sh ..`` meant before: it deleted everything beside the project), a
non-empty folder, a previous export refreshed (stale files removed, the user's .git kept).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "export_slicer_extension.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None,
                                reason="needs bash and git")


def _project_copy(tmp_path: Path) -> Path:
    """A minimal project (scripts/ + slicer_extension/) inside a parent folder that holds other work."""
    parent = tmp_path / "parent"
    project = parent / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, project / "scripts" / SCRIPT.name)
    shutil.copytree(ROOT / "slicer_extension", project / "slicer_extension",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (parent / "other_work").mkdir()
    (parent / "other_work" / "thesis.tex").write_text("precious")
    (parent / "notes.txt").write_text("precious too")
    return project


def _run(project: Path, target) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    return subprocess.run(["bash", str(project / "scripts" / SCRIPT.name), str(target)], cwd=project,
                          capture_output=True, text=True, env=env, timeout=120)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".git" not in p.relative_to(folder).parts}


def test_parent_folder_is_refused_and_left_intact(tmp_path):
    project = _project_copy(tmp_path)
    before = _digest(project.parent)
    res = _run(project, "..")
    assert res.returncode != 0
    assert "refused" in res.stderr and "contains the project" in res.stderr
    assert _digest(project.parent) == before  # the project, other_work/ and notes.txt all kept


def test_non_empty_foreign_folder_is_refused(tmp_path):
    project = _project_copy(tmp_path)
    foreign = tmp_path / "someone_elses"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    res = _run(project, foreign)
    assert res.returncode != 0 and "not an export made by this script" in res.stderr
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    # inside the project: refused as well, and nothing created there
    res = _run(project, project / "slicer_extension" / "sub")
    assert res.returncode != 0 and "inside the project" in res.stderr
    assert not (project / "slicer_extension" / "sub").exists()


def test_new_folder_then_refresh_removes_only_its_own_files(tmp_path):
    project = _project_copy(tmp_path)
    target = tmp_path / "SlicerHybridCT"
    res = _run(project, target)
    assert res.returncode == 0, res.stderr
    exported = _digest(target)
    source = _digest(project / "slicer_extension")
    assert {k: v for k, v in exported.items() if k not in (".gitignore", ".hybrid-ct-export")} == source
    manifest = (target / ".hybrid-ct-export").read_text().split()
    assert "CMakeLists.txt" in manifest and "HybridCT/HybridCT.py" in manifest
    assert (target / ".git").is_dir()

    # a file deleted from the project disappears from the export; the user's own files stay
    (project / "slicer_extension" / "README.md").unlink()
    (target / "MY_NOTES.md").write_text("mine")
    (target / "HybridCT" / "local.cfg").write_text("mine too")
    res = _run(project, target)
    assert res.returncode == 0, res.stderr
    assert not (target / "README.md").exists()
    assert (target / "MY_NOTES.md").read_text() == "mine"
    assert (target / "HybridCT" / "local.cfg").read_text() == "mine too"
    assert (target / "HybridCT" / "HybridCT.py").is_file()
    log = subprocess.run(["git", "-C", str(target), "log", "--oneline"], capture_output=True, text=True).stdout
    assert len(log.strip().splitlines()) == 2


def test_manifest_cannot_point_outside_the_target(tmp_path):
    project = _project_copy(tmp_path)
    target = tmp_path / "export"
    assert _run(project, target).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    with open(target / ".hybrid-ct-export", "a") as f:
        f.write("../victim.txt\n/etc/hostname\n")
    assert _run(project, target).returncode == 0
    assert victim.read_text() == "outside"
