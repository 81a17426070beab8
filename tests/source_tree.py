"""gptcli's source files and what each imports, read with ast (test_architecture.py's import rules,
test_inspect.py's torch-free inspect-params)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gptcli"


def imports_of(path: Path, text: str | None = None) -> set[str]:
    """Absolute names of every module `path` (or `text`, read as if it were `path`) imports, at any depth:
    lazy imports inside functions too."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names
