"""The command line: the registered commands, `python -m gptcli`, `gpt init`."""

from __future__ import annotations

import typer.main

from conftest import assert_user_error, run_gpt
from gptcli.cli import app
from gptcli.config import Project, load_project

COMMANDS = ["init", "inspect-params", "load-hf", "export-hf", "generate", "eval", "train", "plot", "prepare"]


def test_registered_commands_are_pinned():
    registered = sorted(typer.main.get_command(app).commands)
    assert registered == sorted(COMMANDS)


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
