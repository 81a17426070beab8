"""The docs name tests and files that exist: a renamed test must not leave a reliability row pointing nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_test_a_page_names_exists(page):
    named = re.findall(r"(tests/test_\w+\.py)::(\w+)", page.read_text())
    missing = [f"{path}::{name}" for path, name in named
               if not (REPO / path).is_file() or f"def {name}(" not in (REPO / path).read_text()]
    assert not missing, missing


def test_the_reliability_page_names_a_test_for_every_row():
    rows = [line for line in (REPO / "docs" / "reliability.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| fault", "| code", "| 0 ", "| 1 ", "| 2 ", "| 4 ",
                                                                    "| 130"))]
    assert len(rows) > 20
    assert all("tests/test_" in row for row in rows), [row for row in rows if "tests/test_" not in row]
