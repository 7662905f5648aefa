"""The docs the code must match: every module has a row in the developer guide's table,
and every document the code cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "remote_vector_index_builder"


def table_modules() -> set[str]:
    """Module paths named in the first column of DEVELOPER_GUIDE.md's module table."""
    names: set[str] = set()
    for line in (ROOT / "DEVELOPER_GUIDE.md").read_text().splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([\w/]+\.py)`", line.split("|")[1]))
    return names


def test_every_module_of_the_package_is_in_the_developer_guide() -> None:
    modules = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }
    assert sorted(modules - table_modules()) == []
    assert sorted(table_modules() - modules) == [], "rows for modules that do not exist"


def test_the_documents_the_code_cites_exist() -> None:
    cited: set[str] = set()
    for folder in ("remote_vector_index_builder", "test_remote_vector_index_builder", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            cited.update(re.findall(r"\b((?:[\w-]+/)*[\w-]+\.md)\b", path.read_text()))
    assert "docs/knn-contract.md" in cited
    missing = [name for name in sorted(cited) if not (ROOT / name).exists()]
    assert missing == []
