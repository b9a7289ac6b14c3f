"""The project stands alone: no tracked file outside test/ points into ../shared (a clone has
no such folder); the documentation it needs lives under docs/."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

OUTSIDE = re.compile(r"\.\./shared|shared/docs|shared/data")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True)
    return [f for f in out.stdout.decode().split("\0") if f and not f.startswith("test/")]


def test_no_reference_to_the_shared_folder() -> None:
    hits = []
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, bags
            continue
        hits += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert not hits, "references to ../shared:\n" + "\n".join(hits)


def test_the_docs_the_readme_promises_exist() -> None:
    for doc in ("ros.md", "evaluation.md", "architecture.md"):
        assert (REPO / "docs" / doc).is_file(), doc
    image = REPO / "docs" / "images" / "overlay_spot_test_tiny.png"
    assert image.is_file() and image.stat().st_size < 300_000
    assert "docs/images/overlay_spot_test_tiny.png" in (REPO / "README.md").read_text()
