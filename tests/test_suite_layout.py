"""The test suite's own layout: shared helpers live in conftest.py and tiny.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_test_module_imports_another():
    # A helper imported from a test module drags that module's tests into the importer's
    # namespace and hides where the helper lives; tests/tiny.py and conftest.py hold them.
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted(ROOT.glob("examples/*/tests/*.py"))
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(name.rsplit(".", 1)[-1].startswith("test_") for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert files and not offenders, offenders
