"""Result files name the sources they ran: the digest of the tree on disk matches the digest of the
git revision it was checked out from, and changes with any source file."""

import subprocess

import pytest

from benchmarks.harness import provenance


def _clean_checkout() -> bool:
    try:
        status = subprocess.run(
            ["git", "-C", str(provenance.REPO), "status", "--porcelain", "--", *provenance.SOURCE_DIRS],
            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return status.strip() == ""


@pytest.mark.skipif(not _clean_checkout(), reason="needs a git checkout without source changes")
def test_digest_of_the_tree_matches_its_commit():
    assert provenance.source_digest() == provenance.source_digest("HEAD")
    assert len(provenance.source_digest()) == 12


def test_digest_changes_with_a_source_file(monkeypatch, tmp_path):
    for d in provenance.SOURCE_DIRS:
        (tmp_path / d).mkdir()
    (tmp_path / "kernels" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    before = provenance.source_digest()
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert provenance.source_digest() != before
    (tmp_path / "kernels" / "a.py").write_text("x = 1\n")
    (tmp_path / "kernels" / "__pycache__").mkdir()
    (tmp_path / "kernels" / "__pycache__" / "a.py").write_text("cache")
    assert provenance.source_digest() == before, "caches do not count"
