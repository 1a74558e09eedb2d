"""The links between README.md and docs/ lead somewhere: every relative link names a file of the
repository, and every #anchor a heading of that file (as GitHub turns headings into anchors)."""

import re
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def relative_links(document: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def test_anchors_are_githubs():
    assert anchor("The trajectory file (HDF5, format version 1)") == (
        "the-trajectory-file-hdf5-format-version-1"
    )
    assert anchor("`smoothprof fit --json`") == "smoothprof-fit---json"


def test_the_readme_links_the_moved_documents():
    links = relative_links(REPO / "README.md")
    for name in ("docs/results.md", "docs/benchmarks.md", "docs/distributed.md"):
        assert name in links


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.relative_to(REPO).as_posix())
def test_relative_links_resolve(document):
    assert relative_links(document)
    for link in relative_links(document):
        path, _, fragment = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        assert target.is_file(), f"{document.name}: {link} names no file"
        if fragment:
            assert fragment in anchors(target), f"{document.name}: {link} names no heading"
