"""The import rules of docs/architecture.md: each module imports only its own layer and the layers below it
(so nothing imports the CLI and nothing below train/ imports train/), no two modules import each other
through any chain, DeepSpeed stays in train/, and the CLI starts without torch."""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gpt_env
from source_tree import PACKAGE, imports_of

# docs/architecture.md's layers, lowest first. A module may import its own layer and the ones below it.
LAYERS = {
    "foundation": ["__init__.py", "errors.py", "paths.py", "parsing.py", "locks.py", "fsutil.py", "machine.py",
                   "presets.py", "batch.py", "config.py", "rundir.py", "registry.py", "optimizers.py", "objectives.py",
                   "planner/*.py"],
    "text and the model": ["tokenizer.py", "tokenizer_files.py", "openai_bpe.py", "attention.py", "model.py",
                           "leaks.py", "modeldir.py", "inspect.py", "data/*.py"],
    "using a model": ["runtime.py", "generate.py", "evaluate.py", "objective_eval.py", "hf/*.py", "tasks/*.py"],
    "training": ["train/*.py"],
    "command line": ["cli.py", "__main__.py"],
}
ALL_MODULES = sorted(PACKAGE.rglob("*.py"))


def module_file(name: str) -> Path | None:
    """The file of the longest prefix of `name` (gptcli.a.b, or gptcli.a.b.some_function) that is a module
    or a package of gptcli."""
    parts = name.split(".")[1:]
    for end in range(len(parts), -1, -1):
        base = PACKAGE.joinpath(*parts[:end])
        if end and base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
    return None


def layer_of(path: Path | None) -> int:
    """The index in LAYERS of a module file; -1 for one no layer lists."""
    relative = path.relative_to(PACKAGE).as_posix() if path is not None else ""
    for index, patterns in enumerate(LAYERS.values()):
        if any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns):
            return index
    return -1


def test_every_module_has_a_layer():
    """A new module is placed in LAYERS (and in docs/architecture.md's layout) before the rule can hold it."""
    assert [str(p.relative_to(PACKAGE)) for p in ALL_MODULES if layer_of(p) < 0] == []


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_own_layer_and_the_ones_below(path):
    own = layer_of(path)
    upward = sorted(name for name in imports_of(path) if name.startswith("gptcli.")
                    and layer_of(module_file(name)) > own)
    assert upward == [], f"{path.relative_to(PACKAGE)} ({list(LAYERS)[own]}) imports {upward}"


# Optimizer builders (optimizers.py: AdamW's picks DeepSpeed's CPU Adam or FusedAdam) import DeepSpeed inside
# the builder, which only train/engine.py calls; the module itself imports none, so the planner and the
# schema read the specs where DeepSpeed is not installed.
BUILDERS = ["optimizers.py"]


def module_level_imports(path: Path) -> set[str]:
    """The names `path` imports outside its functions' bodies."""
    tree = ast.parse(path.read_text())
    inside = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


@pytest.mark.parametrize("path", [p for p in ALL_MODULES if p.relative_to(PACKAGE).parts[0] != "train"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_outside_train_imports_deepspeed(path):
    builder = path.relative_to(PACKAGE).as_posix() in BUILDERS
    found = module_level_imports(path) if builder else imports_of(path)
    assert not [name for name in found if name.split(".")[0] == "deepspeed"], sorted(found)


def imported_files(path: Path, text: str | None = None) -> set[Path]:
    """The module files of gptcli that `path` imports, lazy imports included. `from PACKAGE import module`
    imports that module, not the package's __init__.py (which Python runs on the way to any submodule)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            found.update(module_file(alias.name) for alias in node.names if alias.name.startswith("gptcli."))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if not module.startswith("gptcli"):
                continue
            for alias in node.names:
                found.add(module_file(f"{module}.{alias.name}"))
    return {target for target in found if target is not None and target != path}


def import_graph() -> dict[Path, set[Path]]:
    """Each module file → the module files it imports."""
    return {path: imported_files(path) for path in ALL_MODULES}


def cycles(graph: dict) -> list[list]:
    """The strongly connected components of more than one node (Tarjan's algorithm): each a set of modules
    that import each other through some chain."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    """No circle of imports, inside a layer or across: each module can be read after the ones it uses."""
    found = [[str(p.relative_to(PACKAGE)) for p in component] for component in cycles(import_graph())]
    assert found == []


def test_the_cycle_check_finds_a_circle():
    """The checker itself: a lazy import back from model.py to modeldir.py (which imports model.py) is a circle."""
    graph = import_graph()
    lazy = "def f():\n    from .modeldir import load_model_dir\n"
    model = PACKAGE / "model.py"
    graph[model] = graph[model] | imported_files(model, lazy)
    assert any({model, PACKAGE / "modeldir.py"} <= set(component) for component in cycles(graph))


def test_the_layers_rule_refuses_an_upward_import():
    """The checker itself: a lazy import of train/ from the model layer, or of the CLI from train/, is upward."""
    own = layer_of(PACKAGE / "model.py")
    lazy = "def f():\n    from .train import loop\n    from . import cli\n"
    found = {name for name in imports_of(PACKAGE / "model.py", lazy) if name.startswith("gptcli.")}
    assert {layer_of(module_file(name)) > own for name in found} == {True}
    assert layer_of(module_file("gptcli.train.loop.train")) == list(LAYERS).index("training")
    assert layer_of(module_file("gptcli")) == 0 and layer_of(PACKAGE / "planner_of_the_future.py") == -1


def test_the_rule_sees_imports_it_should_refuse():
    """The checker itself: relative imports resolve, and lazy imports of train/ and deepspeed are found."""
    names = imports_of(PACKAGE / "data" / "loader.py")
    assert "gptcli.data.shards" in names and "gptcli.errors" in names  # `from .shards`, `from ..errors`
    lazy = "def f():\n    from ..train import loop\n    import deepspeed\n"
    assert {"gptcli.train", "gptcli.train.loop", "deepspeed"} <= imports_of(PACKAGE / "hf" / "probe.py", lazy)


def test_the_planner_is_arithmetic_without_torch():
    """inspect-params and pre-flight ask it before anything heavy is imported."""
    code = ("import sys, gptcli.planner as p; from gptcli.config import project_from_dict; "
            "p.plan_run(project_from_dict({'model': {'preset': 'gpt2'}}), gpu=p.find_gpu('H100'), capacity=80 << 30); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}  # this checkout's src, not an installed gptcli
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_cli_starts_without_torch_or_deepspeed():
    """Nor does `gpt plot` import torch (metrics.py): about 2 s of its 3."""
    code = ("import sys, gptcli.cli, gptcli.config, gptcli.train.command, gptcli.train.observing.metrics; "
            "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=gpt_env())
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.slow  # a pytest run of its own
def test_the_suite_without_its_dependencies_stops_with_one_sentence(tmp_path):
    """pytest in a Python where the project's dependencies are missing (here tiktoken, hidden by a module
    that refuses to import) stops at once with what to install, not pytest's INTERNALERROR traceback."""
    (tmp_path / "tiktoken.py").write_text('raise ImportError("hidden by the test", name="tiktoken")\n')
    env = gpt_env({"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(Path(__file__).with_name("test_config.py"))],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 4 and "INTERNALERROR" not in output and "Traceback" not in output, output[-2000:]
    assert 'tiktoken is not: run pip install -e ".[test]" first' in output
