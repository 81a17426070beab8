"""The command line: the registered commands, `python -m gptcli`, `gpt init`."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

import gptcli
from conftest import assert_user_error, gpt_env, run_gpt
from gptcli.cli import app
from gptcli.config import Project, field_doc, field_range, load_project, section_class

COMMANDS = ["init", "inspect-params", "load-hf", "export-hf", "generate", "eval", "train", "plot", "prepare"]


def test_registered_commands_are_pinned():
    registered = sorted(typer.main.get_command(app).commands)
    assert registered == sorted(COMMANDS)


# A command parses, calls one function and renders (docs/architecture.md: "cli.py does no work"); a longer one
# has grown work or rendering that belongs in a helper.
COMMAND_LINES = 30


def test_every_command_function_is_at_most_30_lines_signature_included():
    lengths = {}
    for info in [*app.registered_commands, app.registered_callback]:
        lines, _ = inspect.getsourcelines(info.callback)
        lengths[info.callback.__name__] = len(list(itertools.dropwhile(lambda line: line.lstrip().startswith("@"),
                                                                       lines)))
    assert "eval_command" in lengths and "options" in lengths, lengths
    assert {name: n for name, n in lengths.items() if n > COMMAND_LINES} == {}


def test_help_lists_every_command():
    result = run_gpt("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_init_writes_a_loadable_commented_file(tmp_path):
    result = run_gpt("init", tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_project(tmp_path / "run.toml") == Project()
    again = run_gpt("init", tmp_path)
    assert_user_error(again, "already exists", "--force")
    assert run_gpt("init", tmp_path, "--preset", "nano", "--force").returncode == 0
    assert load_project(tmp_path / "run.toml").model.n_embd == 64


def test_init_with_unknown_preset_writes_nothing(tmp_path):
    assert_user_error(run_gpt("init", tmp_path, "--preset", "gtp2"), 'did you mean "gpt2"')
    assert not (tmp_path / "run.toml").exists()


def test_usage_errors_exit_2():
    result = run_gpt("inspect-params", "--gpus", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_usage_errors_are_raised_one_way(tmp_path):
    """gptcli's own usage errors are errors.UsageError (exit 2, one sentence like every GptError), from the
    CLI or from the module it calls; never typer.BadParameter or a GptError given exit code 2 by hand."""
    package = Path(__file__).resolve().parents[1] / "src" / "gptcli"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "BadParameter" not in text, path
        assert "exit_code=2" not in text or path.name == "errors.py", path
    both = run_gpt("prepare", "notes.txt", "--verify", tmp_path, cwd=tmp_path)
    assert both.returncode == 2 and both.stderr.startswith("error: --verify: give either INPUT... or --verify DIR")
    assert len(both.stderr.strip().splitlines()) == 1


def parser_bounds(param) -> list:
    """An option's min/max as the parser holds them (typer 0.2x: on the option; click: on its type)."""
    kind = getattr(param, "type", None)
    return [getattr(param, "min", None), getattr(param, "max", None), getattr(kind, "min", None),
            getattr(kind, "max", None)]


# Commands whose options stand for keys of one [section], as `--set section.key=value` overrides.
KEY_SECTIONS = {"prepare": "data", "generate": "generate", "eval": "eval", "inspect-params": "train"}


def test_every_option_named_after_a_key_takes_its_help_and_range_from_the_schema():
    """One schema: an option named after a key of its command's section is documented by that key's doc line
    and range, and has no bounds of its own (the schema checks the value when the project loads)."""
    group = typer.main.get_command(app)
    checked = []
    for command, section in KEY_SECTIONS.items():
        keys = {f.name for f in dataclasses.fields(section_class(section))}
        for param in group.commands[command].params:
            if param.param_type_name != "option" or param.name not in keys:
                continue
            where = f"gpt {command} {param.opts[0]}"
            assert param.help.startswith(field_doc(section, param.name)), where
            assert param.help.endswith(f"default: [{section}] {param.name})"), where
            bounds = field_range(section, param.name)
            assert bounds is None or f"({bounds}; default" in param.help, where
            assert parser_bounds(param) == [None] * 4, where
            checked.append(f"{section}.{param.name}")
    assert {"data.val_fraction", "data.workers", "data.shard_tokens", "data.vocab_dir", "generate.top_p",
            "eval.text", "eval.stride", "train.precision"} <= set(checked), checked


def test_inspect_params_help_states_the_planners_gpu_names_and_where_the_mfu_comes_from():
    """The planner's GPU table is said in --help from the planner, not copied; the MFU's sources are named."""
    from gptcli import planner

    params = {param.name: param for param in typer.main.get_command(app).commands["inspect-params"].params}
    gpu_help = params["gpu"].help
    assert gpu_help.endswith(f"{', '.join(planner.gpu_names())}.") and "H100-SXM" in gpu_help
    assert "measured" in params["mfu"].help and "published runs" in params["mfu"].help
    assert [name for name in planner.gpu_names() if name not in gpu_help] == []


def test_an_option_out_of_its_keys_range_gets_the_schemas_sentence(tmp_path):
    result = run_gpt("prepare", "notes.txt", "--val-fraction", "1", cwd=tmp_path)
    assert result.returncode == 1 and "internal error" not in result.stderr
    assert_user_error(result, "data.val_fraction must be in [0, 1), not 1.0")
    help_text = " ".join(run_gpt("prepare", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "(in [0, 1); default: [data] val_fraction)" in help_text


def test_changing_the_preset_of_an_init_file_takes_effect(tmp_path):
    """The keys a preset decides are written as comments, so a one-line preset change is not pinned."""
    assert run_gpt("init", tmp_path, "--preset", "nano").returncode == 0
    path = tmp_path / "run.toml"
    assert load_project(path).model.n_embd == 64
    tiny = load_project(path, ["model.preset=tiny"])
    assert (tiny.model.n_embd, tiny.model.block_size, tiny.train.max_steps) == (128, 256, 300)
    gpt2 = load_project(path, ["model.preset=gpt2"])
    assert gpt2.model.n_embd == 768 and gpt2.train.lr == Project().train.lr  # nano's lr does not stick
    assert run_gpt("init", tmp_path, "--force").returncode == 0
    nano = load_project(path, ["model.preset=nano"])
    assert nano.model.n_embd == 64 and nano.train.lr == 3e-3
    assert "# n_embd = 768" in path.read_text()


def test_init_into_a_file_or_under_a_file_is_one_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_gpt("init", tmp_path / "notes.txt")
    assert result.returncode == 1 and "internal error" not in result.stderr
    assert_user_error(result, "notes.txt is a file, not a directory")
    under = run_gpt("init", tmp_path / "notes.txt" / "sub")
    assert under.returncode == 1 and "internal error" not in under.stderr
    assert_user_error(under, "Cannot create", "notes.txt is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    created = run_gpt("init", tmp_path / "new" / "dir")  # a missing parent is created
    assert created.returncode == 0 and (tmp_path / "new" / "dir" / "run.toml").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs")
def test_init_into_a_read_only_dir_is_one_sentence(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_gpt("init", locked)
        assert result.returncode == 1 and "internal error" not in result.stderr
        assert_user_error(result, "Cannot write", "run.toml", "Permission denied")
    finally:
        locked.chmod(0o700)


@pytest.mark.slow
def test_version_and_short_help_on_every_command():
    version = run_gpt("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"gptcli {gptcli.__version__}"
    for name in ["", *COMMANDS]:
        result = run_gpt(*name.split(), "-h", env={"COLUMNS": "200"})
        assert result.returncode == 0, (name, result.stderr)
        assert "Usage:" in result.stdout and "--help" in result.stdout
        assert "<bool>" not in result.stdout, name  # flags take no value; the help does not pretend they do


@pytest.mark.slow
def test_quick_commands_do_not_import_torch(tmp_path):
    """--help, --list, init and a configuration error answer without loading torch (issue: start-up time)."""
    probe = ("import sys\nfrom gptcli.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept BaseException:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    cases = [["--help"], ["inspect-params", "--list"], ["init", str(tmp_path / "a")],
             ["inspect-params", "--set", "train.lr=nan"], ["generate", "Hi", "--top-p", "2"],
             ["eval", "--stride", "-1"]]
    for args in cases:
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path,
                                env=gpt_env(), timeout=120)
        assert result.stderr.strip().endswith("NO-TORCH"), (args, result.stderr)


def test_init_where_the_file_system_refuses_is_one_sentence(tmp_path, monkeypatch):
    """What a read-only dir does to a non-root user, also when the tests run as root."""
    import gptcli.fsutil
    from gptcli.config import ConfigError, write_template

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(gptcli.fsutil, "atomic_write_text", refuse)
    with pytest.raises(ConfigError, match=r"Cannot write .*run.toml: Permission denied\.$"):
        write_template(tmp_path)
    assert not (tmp_path / "run.toml").exists()


def test_prepare_summarises_many_inputs_in_80_columns(monkeypatch, capsys):
    """168 files of one dir (the demo's corpus): a few rows named relative to that dir, then the others'
    totals, all within 80 columns; --json still lists every input."""
    import io

    from rich.console import Console

    import gptcli.cli as cli
    from gptcli.data.prepare import InputCount, PrepareSummary

    directory = "/usr/lib/python3.11/a/rather/long/directory/of/the/standard/library"
    inputs = [InputCount(f"{directory}/module_{i:03d}.py", documents=1, tokens=100 + i, bytes=400 + i)
              for i in range(168)]
    summary = PrepareSummary(out=Path("data"), documents={"train": 160, "val": 8}, tokens={"train": 1, "val": 1},
                             shards={"train": 1, "val": 1}, bytes=sum(c.bytes for c in inputs), replaced_bytes=0,
                             seconds=1.0, workers=2, split={"rule": "draw", "val_blocks": 8, "blocks": 168,
                                                            "block_tokens": 2048}, inputs=inputs)
    screen = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=screen, width=80, color_system=None))
    cli.show_prepare_summary(summary, as_json=False, next_command="gpt train")
    lines = screen.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "by input, in …" + f"{directory}/"[-(cli.INPUT_WIDTH - 1):] in " ".join(lines)
    rows = [line for line in lines if "module_" in line]
    assert [row.split()[1] for row in rows] == [f"module_{i:03d}.py" for i in range(cli.INPUT_ROWS - 1)]
    rest = inputs[cli.INPUT_ROWS - 1:]
    totals = [f"{len(rest)}", f"{sum(c.tokens for c in rest):,}", f"{sum(c.bytes for c in rest):,}"]
    (more,) = [line for line in lines if "more inputs" in line]
    assert f"… and {totals[0]} more inputs" in more and more.replace("│", " ").split()[-2:] == totals[1:]
    cli.show_prepare_summary(summary, as_json=True, next_command="gpt train")
    assert len(json.loads(capsys.readouterr().out)["inputs"]) == 168


# --- every command against bad paths (issues 21 and 26) --------------------------------------------------------


def bad_path_cases(tmp: "Path") -> list[tuple[str, list[str]]]:
    """(label, argv) of every command given a missing path, a file where a dir goes and a dir where a file
    goes, and a path under a file (what a root-run test has for "unwritable": chmod does not stop root)."""
    f, d, m, u = tmp / "a-file.txt", tmp / "a-dir", tmp / "missing", tmp / "a-file.txt" / "under"
    model, run = str(tmp / "model"), str(tmp / "run")
    cases = {
        "init into a file": ["init", str(f)], "init under a file": ["init", str(u)],
        "inspect-params, missing project": ["inspect-params", "--project", str(m)],
        "inspect-params, project is a dir": ["inspect-params", "--project", str(d)],
        "prepare, missing input": ["prepare", str(m), "--out", str(tmp / "out")],
        "prepare, out is a file": ["prepare", str(tmp / "corpus.txt"), "--out", str(f)],
        "prepare, out under a file": ["prepare", str(tmp / "corpus.txt"), "--out", str(u)],
        "prepare, verify a missing dir": ["prepare", "--verify", str(m)],
        "prepare, verify a file": ["prepare", "--verify", str(f)],
        "train, missing project": ["train", "--project", str(m)],
        "train, project is a dir": ["train", "--project", str(d)],
        "train, out_dir is a file": ["train", "--set", f'project.out_dir="{f}"'],
        "train, out_dir under a file": ["train", "--set", f'project.out_dir="{u}"'],
        "train, hostfile is a dir": ["train", "--hostfile", str(d)],
        "train, missing hostfile": ["train", "--hostfile", str(m)],
        "train --consolidate, missing run": ["train", "--consolidate", "--set", f'project.out_dir="{m}"'],
        "plot, missing run": ["plot", str(m)], "plot, run is a file": ["plot", str(f)],
        "plot, out is a dir": ["plot", run, "--out", str(d)], "plot, out under a file": ["plot", run, "--out", str(u)],
        "plot, out in a missing dir": ["plot", run, "--out", str(m / "x.png")],
        "generate, missing checkpoint": ["generate", "hi", "--checkpoint", str(m)],
        "generate, checkpoint is a file": ["generate", "hi", "--checkpoint", str(f)],
        "generate, checkpoint is an empty dir": ["generate", "hi", "--checkpoint", str(d)],
        "eval, missing checkpoint": ["eval", "--checkpoint", str(m)],
        "eval, missing text": ["eval", "--checkpoint", model, "--text", str(m)],
        "eval, text is a dir": ["eval", "--checkpoint", model, "--text", str(d)],
        "eval, missing data dir": ["eval", "--checkpoint", model, "--set", f'data.dir="{m}"'],
        "load-hf, missing source": ["load-hf", str(m), "--out", str(tmp / "out")],
        "load-hf, source is an empty dir": ["load-hf", str(d), "--out", str(tmp / "out")],
        "load-hf, out is a file": ["load-hf", str(tmp / "hf"), "--out", str(f)],
        "load-hf, out under a file": ["load-hf", str(tmp / "hf"), "--out", str(u)],
        "export-hf, missing model": ["export-hf", str(m), "--out", str(tmp / "out")],
        "export-hf, out is a file": ["export-hf", model, "--out", str(f)],
        "export-hf, out under a file": ["export-hf", model, "--out", str(u)],
    }
    return list(cases.items())


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory):
    """A file, an empty dir, a corpus, a run with metrics, a small model dir and its Hugging Face export."""
    import torch

    from gptcli.config import ModelConfig
    from gptcli.hf import export_hf
    from gptcli.model import GPT
    from gptcli.modeldir import save_model_dir
    from gptcli.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("bad-paths")
    (tmp / "a-file.txt").write_text("mine")
    (tmp / "a-dir").mkdir()
    (tmp / "corpus.txt").write_text("some text\n")
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 10.0}\n')
    torch.manual_seed(0)
    save_model_dir(tmp / "model", GPT(ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)), load_tokenizer("gpt2"))
    export_hf(tmp / "model", tmp / "hf")
    return tmp


def test_every_command_answers_bad_paths_in_one_sentence(bad_paths, monkeypatch, capsys):
    """No command may answer a missing path, a file for a dir (or the reverse) or a path under a file with
    "internal error" or a traceback: one sentence and a non-zero exit, and nothing created or changed."""
    import signal

    from gptcli import cli

    monkeypatch.chdir(bad_paths)
    environment = dict(os.environ)  # train sets RANK, WORLD_SIZE, ... in-process; later tests must not inherit them
    before = sorted(str(p) for p in bad_paths.rglob("*"))
    handler = signal.getsignal(signal.SIGTERM)
    failures = []
    for label, argv in bad_path_cases(bad_paths):
        monkeypatch.setattr(sys, "argv", ["gpt", *argv])
        try:
            cli.main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            signal.signal(signal.SIGTERM, handler)
            os.environ.clear()
            os.environ.update(environment)
        output = capsys.readouterr()
        said = " ".join((output.err + output.out).split())
        if code in (0, None) or "internal error" in said or "Traceback" in said or not said:
            failures.append(f"{label}: exit {code}: {said[-300:]}")
    assert not failures, "\n".join(failures)
    assert sorted(str(p) for p in bad_paths.rglob("*")) == before
