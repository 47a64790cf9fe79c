"""docs/testing.md's table of rules names tests that exist: a renamed or removed test is seen
here, not by a newcomer following the table."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Rules and the tests that hold them"


def _named_tests() -> list[tuple[str, str | None]]:
    """(file under tests/, test name or None for a whole module) for every reference."""
    text = (REPO / "docs" / "testing.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    named: list[tuple[str, str | None]] = []
    for row in section.splitlines():
        if not row.startswith("| ") or row.startswith("| doc "):
            continue
        last_file: str | None = None
        for ref in re.findall(r"`([^`]+)`", row.rsplit(" | ", 1)[1]):
            file, _, test = ref.partition("::")
            if file:
                last_file = file
            assert last_file is not None, f"{ref!r} names no file: {row}"
            named.append((last_file, test or None))
    return named


def test_every_test_the_rules_table_names_exists() -> None:
    named = _named_tests()
    assert len(named) > 60
    missing = []
    for file, test in named:
        path = REPO / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif test is not None and not re.search(
            rf"^(async )?def {re.escape(test)}\(", path.read_text(), re.MULTILINE
        ):
            missing.append(f"{file}::{test}")
    assert missing == []
