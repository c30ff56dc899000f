"""The README's and docs/' links to files of this repository lead somewhere: the file exists and,
where a link names a section (``file.md#section``), the file has a heading of that name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    lines = page.read_text(encoding="utf-8").splitlines()
    return {slug(m.group(1)) for line in lines if (m := re.match(r"#+\s+(.*)", line))}


def local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text(encoding="utf-8"))
            if not re.match(r"[a-z]+:", t)]


def test_slug_follows_github():
    assert slug("Segmentation (the CNN inference engine)") == "segmentation-the-cnn-inference-engine"
    assert slug("Aggregation: the atlas against the demo's truth") == \
        "aggregation-the-atlas-against-the-demos-truth"
    assert slug("`atlasbuilder build`, step 2") == "atlasbuilder-build-step-2"
    assert slug("The `min_area_mm3` rule") == "the-min_area_mm3-rule"


def test_the_readme_links_the_accuracy_page():
    assert any(t.startswith("docs/demo_accuracy.md") for t in local_links(ROOT / "README.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_local_links_resolve(page):
    for target in local_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: {dest} does not exist"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: link to {target}: no such heading in {dest.name}"
