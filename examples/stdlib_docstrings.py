"""The built-in corpus of examples/demo.sh: the docstrings of the Python standard library's public top-level
modules, one JSON line ({"text": ...}) per module, each line of a docstring unindented.

    python examples/stdlib_docstrings.py OUT.jsonl

Every machine with Python has it: about 0.8 MB of English. The source code itself makes a poor demo for GPT-2's
BPE, which gives each space of indentation a token of its own (41% of the tokens): a model as small and as short
as the demo's mostly learns to continue with spaces. Indentation inside a docstring (argument lists, examples)
would be spaces again, so every line loses it. OUT is complete or absent (gptcli's own atomic write: beside it,
then renamed; never through a link).
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

from gptcli.fsutil import atomic_write_text

DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_text(path: Path) -> str:
    """A module's docstrings, in the order ast.walk meets them, blank-line separated; "" for none."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, DOCUMENTED)]
    return "\n\n".join("\n".join(line.strip() for line in doc.splitlines()) for doc in docs if doc)


def main(out: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = (module_text(path) for path in sorted(stdlib.glob("[!_]*.py")))
    atomic_write_text(out, "".join(json.dumps({"text": text}) + "\n" for text in texts if text))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
