"""Result files name the sources they ran: the digest of the tree on disk matches the digest of the
git revision it was checked out from, and changes with any source file."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "accuracy"))

import suite  # noqa: E402


def _clean_checkout() -> bool:
    try:
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *suite.SOURCE_DIRS],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return status.strip() == ""


@pytest.mark.skipif(not _clean_checkout(), reason="needs a git checkout without source changes")
def test_digest_of_the_tree_matches_its_commit():
    assert suite.source_digest() == suite.source_digest("HEAD")
    assert len(suite.source_digest()) == 12


def test_digest_changes_with_a_source_file(monkeypatch, tmp_path):
    for d in suite.SOURCE_DIRS:
        (tmp_path / d).mkdir()
    (tmp_path / "kernels" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(suite, "REPO", tmp_path)
    before = suite.source_digest()
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert suite.source_digest() != before
    (tmp_path / "kernels" / "a.py").write_text("x = 1\n")
    (tmp_path / "kernels" / "__pycache__").mkdir()
    (tmp_path / "kernels" / "__pycache__" / "a.py").write_text("cache")
    assert suite.source_digest() == before, "caches do not count"
