"""The documentation: a README that is a front page, and links that lead somewhere."""

import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
PAGES = [PROJECT / "README.md", PROJECT / "CONTRIBUTING.md", PROJECT / "CHANGELOG.md",
         *sorted((PROJECT / "docs").rglob("*.md")), *sorted((PROJECT / "analysis").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def test_the_readme_is_a_front_page():
    text = (PROJECT / "README.md").read_text()
    assert len(text.encode()) <= 8000
    first_screen = "\n".join(text.splitlines()[:40])
    order = [first_screen.find(command) for command in (
        "python -m clipse.search --space baseline", "python -m clipse.search --space debias", "optuna-dashboard ",
        "python -m clipse.final --study debias")]
    assert -1 not in order and order == sorted(order), order
    assert "python -m pytest" in text  # the test command .ci/run runs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(target)
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(target)
    assert broken == []
