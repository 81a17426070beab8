"""Writing files and dirs so that a crash never leaves one that looks complete, and `--force` never deletes
what gptcli did not write."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gptcli.errors import GptError, Stopped
from gptcli.fsutil import (OWNED_FILES, atomic_path, atomic_write_text, check_replaceable, publish_dir, read_owned,
                           staged_dir, staging_dir)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- atomic files ---------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_exception_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert names(tmp_path) == ["metrics.json"]


def test_atomic_write_follows_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x" and mode(tmp_path / "a.txt") == 0o644


# --- staging dirs ---------------------------------------------------------------------------------------------


def test_staging_dir_removes_stale_dirs_of_dead_processes_only(tmp_path, umask_022):
    target = tmp_path / "out"
    dead, live = dead_pid(), os.getppid()
    for name in (f".out.export-hf-{dead}", f".out.export-hf-{live}", f".out.load-hf-{dead}", f".other.export-hf-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    staging = staging_dir(target, "export-hf")
    assert staging.name == f".out.export-hf-{os.getpid()}" and staging.is_dir() and not any(staging.iterdir())
    assert mode(staging) == 0o755  # follows the umask, unlike mkdtemp's 0700
    assert names(tmp_path) == sorted([f".out.export-hf-{live}", f".out.load-hf-{dead}", f".other.export-hf-{dead}",
                                      staging.name])


def test_staged_dir_publishes_with_the_list_of_files(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target, "export-hf") as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"w")
    assert names(target) == [OWNED_FILES, "config.json", "model.safetensors"]
    assert json.loads((target / OWNED_FILES).read_text()) == ["config.json", "model.safetensors"]
    assert read_owned(target) == {OWNED_FILES, "config.json", "model.safetensors"}
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [ValueError("disk full"), KeyboardInterrupt()])
def test_staged_dir_leaves_the_old_target_on_any_exception(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(type(error) if not isinstance(error, KeyboardInterrupt) else Stopped) as raised:
        with staged_dir(target, "load-hf") as staging:
            (staging / "config.json").write_text("new")
            raise error
    assert names(tmp_path) == ["out"] and (target / "config.json").read_text() == "old"
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C: the CLI says where it stopped, exit 130
        assert raised.value.exit_code == 130 and f"{target} was left as it was" in raised.value.where


def test_a_stop_by_sigterm_keeps_its_signal(tmp_path):
    with pytest.raises(Stopped) as raised:
        with staged_dir(tmp_path / "out", "export-hf"):
            raise Stopped(signal.SIGTERM)
    assert raised.value.exit_code == 143 and "export-hf stopped before" in raised.value.where


def test_publish_dir_replaces_the_old_dir_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    staging = staging_dir(target, "model")
    (staging / "new.bin").write_bytes(b"new")
    publish_dir(staging, target)
    assert names(target) == [OWNED_FILES, "new.bin"]
    assert names(tmp_path) == ["out"]


# --- check_replaceable ----------------------------------------------------------------------------------------


def ours(directory: Path, *files: str) -> Path:
    """A dir as publish_dir leaves it: `files` plus their list."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / name).write_text(name)
    (directory / OWNED_FILES).write_text(json.dumps(sorted(files)))
    return directory


def test_replaceable_targets(tmp_path):
    check_replaceable(tmp_path / "missing", force=False, what="model dir")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", force=False, what="model dir")
    check_replaceable(ours(tmp_path / "ours", "config.json"), force=True, what="model dir")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    check_replaceable(legacy, force=True, what="model dir", owned={"config.json"})


@pytest.mark.parametrize("case, fragments", [
    ("file", ["is a file, not a directory"]),
    ("not forced", ["already exists and is not empty", "--force"]),
    ("foreign", ["files gptcli did not write (notes.txt)", "--force replaces only the model dir it wrote"]),
    ("git", ["is a git repository (it holds .git)", "never deletes one"]),
    ("input", ["holds corpus.txt, an input of this command", "never deletes an input"]),
    ("no record", ["holds no record of files written by gptcli (.gptcli-files)"]),
])
def test_refusals_name_the_reason_and_touch_nothing(tmp_path, case, fragments):
    target, inputs, force = tmp_path / "out", [], True
    if case == "file":
        target.write_text("x")
    elif case == "not forced":
        ours(target, "config.json")
        force = False
    elif case == "foreign":
        ours(target, "config.json")
        (target / "notes.txt").write_text("mine")
    elif case == "git":
        ours(target, "config.json")
        (target / ".git").mkdir()
        (target / "README.md").write_text("# my model")
    elif case == "input":
        ours(target, "config.json", "corpus.txt")
        inputs = [target / "corpus.txt"]
    else:
        target.mkdir()
        (target / "config.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(GptError) as error:
        check_replaceable(target, force=force, what="model dir", inputs=inputs)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
