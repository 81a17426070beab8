"""The import rules of docs/architecture.md: the layers import downward only, and DeepSpeed stays in train/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


def modules(*globs: str) -> list[Path]:
    return sorted(path for pattern in globs for path in PACKAGE.glob(pattern))


LOWER_LAYERS = ["model.py", "config.py", "presets.py", "errors.py", "fsutil.py", "tokenizer.py",
                "tokenizer_files.py", "openai_bpe.py", "modeldir.py", "runtime.py", "generate.py",
                "evaluate.py", "inspect.py", "data/*.py", "hf/*.py", "tasks/*.py"]


@pytest.mark.parametrize("path", modules(*LOWER_LAYERS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_train_imports_train_or_deepspeed(path):
    found = imports_of(path)
    assert not [name for name in found if name.startswith(("gptcli.train", "deepspeed"))], sorted(found)


def test_the_rule_sees_imports_it_should_refuse():
    """The checker itself: relative imports resolve, and lazy imports of train/ and deepspeed are found."""
    names = imports_of(PACKAGE / "data" / "loader.py")
    assert "gptcli.data.shards" in names and "gptcli.errors" in names  # `from .shards`, `from ..errors`
    lazy = "def f():\n    from ..train import loop\n    import deepspeed\n"
    assert {"gptcli.train", "gptcli.train.loop", "deepspeed"} <= imports_of(PACKAGE / "hf" / "probe.py", lazy)


def test_the_model_and_data_layers_do_not_import_the_cli():
    for path in modules("model.py", "data/*.py", "hf/*.py", "train/*.py"):
        assert "gptcli.cli" not in imports_of(path), path


def test_the_cli_starts_without_torch_or_deepspeed():
    code = ("import sys, gptcli.cli, gptcli.config, gptcli.train.command; "
            "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
