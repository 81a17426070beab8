"""The command line: the registered commands, `python -m gptcli`, `gpt init`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer.main

import gptcli
from conftest import assert_user_error, gpt_env, run_gpt
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
