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

from conftest import gpt_env, private_null_device
from gptcli.errors import GptError, Stopped
from gptcli.fsutil import (
    OWNED_FILES,
    atomic_path,
    atomic_write_text,
    check_output,
    check_replaceable,
    output_lock,
    publish_dir,
    read_owned,
    staged_dir,
    staging_dir,
)


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
    ("input", ["holds corpus.txt, an input of this command", "never deletes or writes over"]),
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


# --- check_output: the rule every command's output goes through -------------------------------------------------


def is_png(path: Path) -> bool:
    return path.read_bytes().startswith(b"\x89PNG")


def check_png(target, **extra) -> None:
    check_output(target, what="PNG image", directory=False, replaces=is_png, instead="choose another --out", **extra)


@pytest.mark.parametrize("case, fragments", [
    ("device", ["null is a character device, not a regular file"]),
    ("fifo", ["is a FIFO, not a regular file"]),
    ("directory", ["is a directory, not a regular file"]),
    ("link", ["is a symbolic link", "never replaces a link nor writes through one"]),
    ("missing parent", ["does not exist (it is not created silently)"]),
    ("under a file", ["is a file, not a directory"]),
    ("not ours", ["exists and is not a PNG image", "only a PNG image is replaced there"]),
    ("input", ["is an input of this command", "never deletes or writes over"]),
    ("protected", ["lies inside", "the project's data dir"]),
])
def test_a_file_output_is_refused_where_it_is_not_a_file_the_command_writes(tmp_path, case, fragments):
    """gpt plot --out /dev/null, a FIFO, RUN/metrics.jsonl, /nonexistent/dir/x.png, a directory: each refused
    in one sentence before anything is written, nothing created or replaced."""
    target, extra = tmp_path / "out.png", {}
    if case == "device":
        target = private_null_device(tmp_path)
    elif case == "fifo":
        os.mkfifo(target)
    elif case == "directory":
        target.mkdir()
    elif case == "link":
        (tmp_path / "real.png").write_bytes(b"\x89PNG old")
        target.symlink_to(tmp_path / "real.png")
    elif case == "missing parent":
        target = tmp_path / "no" / "such" / "dir" / "x.png"
    elif case == "under a file":
        (tmp_path / "notes.txt").write_text("mine")
        target = tmp_path / "notes.txt" / "x.png"
    elif case == "not ours":
        target = tmp_path / "metrics.jsonl"
        target.write_text('{"step": 1}\n')
    elif case == "input":
        target.write_bytes(b"\x89PNG")
        extra["inputs"] = [tmp_path / "." / "out.png"]
    else:
        (tmp_path / "data").mkdir()
        target = tmp_path / "data" / "x.png"
        extra["protected"] = [(tmp_path / "data", "the project's data dir")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(GptError) as refused:
        check_png(target, **extra)
    for fragment in fragments:
        assert fragment in str(refused.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    if case == "device":
        assert stat.S_ISCHR(target.lstat().st_mode)


def test_a_file_output_is_written_new_or_over_its_own_kind(tmp_path):
    check_png(tmp_path / "new.png")
    (tmp_path / "old.png").write_bytes(b"\x89PNG\r\n\x1a\n...")
    check_png(tmp_path / "old.png")


@pytest.mark.parametrize("case", ["link", "prepared data", "data dir inside", "input inside"])
def test_a_dir_output_is_refused_as_a_link_another_kind_or_over_what_it_must_not_touch(tmp_path, case):
    """prepare --force --out LINK, a model dir written over prepared data, an output holding an input."""
    target, extra = tmp_path / "out", {}
    if case == "link":
        ours(tmp_path / "real", "config.json")
        target.symlink_to(tmp_path / "real")
        fragment = "is a symbolic link"
    elif case == "prepared data":
        target.mkdir()
        (target / "manifest.json").write_text("{}")
        (target / OWNED_FILES).write_text(json.dumps({"what": "prepared data", "files": ["manifest.json"]}))
        fragment = "holds prepared data written by gptcli; --force replaces only what it wrote as model dir"
    elif case == "data dir inside":
        ours(target, "config.json")
        extra["protected"] = [(target / "data", "the project's data dir")]
        fragment = "holds data, the project's data dir"
    else:
        extra["inputs"] = [target / "sub" / "corpus.txt"]
        fragment = "holds corpus.txt, an input of this command"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(GptError, match=fragment):
        check_output(target, what="model dir", force=True, **extra)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


HOLD_OUTPUT = """
import sys, time
from gptcli.fsutil import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def output_holder(tmp_path):
    """Another process holding the output lock of tmp_path/out, as a running `gpt prepare --out out` does."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT, str(tmp_path / "out"), "gpt prepare"],
                               env=gpt_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_writer_of_one_output_is_refused_naming_the_first(tmp_path, output_holder):
    with pytest.raises(GptError) as refused:
        with output_lock(tmp_path / "out", "gpt export-hf"):
            pass
    assert f"is in use by another gpt prepare (pid {output_holder.pid}" in str(refused.value)
    output_holder.kill()
    output_holder.wait()
    with output_lock(tmp_path / "out", "gpt export-hf"):  # a killed holder's lock is taken over
        assert (tmp_path / ".out.gptcli-lock").is_file()
    assert names(tmp_path) == []  # released: nothing left beside the output


def test_an_output_lock_runs_its_check_before_creating_anything_and_again_under_the_lock(tmp_path):
    calls = []
    with output_lock(tmp_path / "new" / "out", "gpt prepare", check=lambda: calls.append((tmp_path / "new").exists())):
        pass
    assert calls == [False, True]
    with pytest.raises(GptError, match="already exists"):
        with output_lock(tmp_path / "x", "gpt prepare", check=lambda: check_replaceable(tmp_path, force=False, what="d")):
            pass
    assert not (tmp_path / ".x.gptcli-lock").exists()


def test_the_current_directory_is_never_replaced(tmp_path, monkeypatch):
    """`gpt prepare corpus.txt --out .` renamed the dir the user stood in (an internal error when it failed)."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for target in (Path("."), tmp_path):
        with pytest.raises(GptError, match="is the current directory or holds it"):
            check_output(target, what="prepared data", force=True)
    check_output(tmp_path / "elsewhere", what="prepared data")
