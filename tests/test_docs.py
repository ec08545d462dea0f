"""The docs stay true: every relative link resolves, and docs/cli.md matches --help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md")])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)", page.read_text())
    missing = [x for x in links if not x.startswith(("http://", "https://", "mailto:"))
               and not (page.parent / x).exists()]  # fmt: skip
    assert missing == []


def test_cli_reference_is_generated_from_help() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "cli_docs.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_every_command_has_a_page_and_a_reference_section() -> None:
    cli = (ROOT / "docs" / "cli.md").read_text()
    for cmd in ("prune", "score", "diff", "merge", "inspect"):
        assert (ROOT / "docs" / "commands" / f"{cmd}.md").exists()
        assert f"## fapm {cmd}\n" in cli
