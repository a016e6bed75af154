"""The repository stands alone: no tracked file sends the reader to a path outside it."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# written in pieces so that this file does not match itself
OUTSIDE = [".." + "/shared", "shared/" + "paper.md", "shared/" + "assets.md"]


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.decode().split("\0") if f]


def test_no_tracked_file_refers_outside_the_repository():
    files = tracked_files()
    assert "README.md" in files and "structlora.py" in files
    hits = []
    for name in files:
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):  # deleted but not yet committed
            continue
        with open(path, "rb") as f:
            data = f.read()
        hits += [f"{name}: {p}" for p in OUTSIDE if p.encode() in data]
    assert not hits, "tracked files refer outside the repository:\n" + "\n".join(hits)


def test_equation_table_points_at_the_papers_notes_in_the_repository():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "docs/paper.md" in readme and os.path.isfile(os.path.join(ROOT, "docs", "paper.md"))
