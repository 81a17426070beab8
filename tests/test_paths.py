"""paths.py's two rules. Writing: gptcli never writes through a symbolic link in its own dirs (a lock beside an
output, the run dir's lock, metrics.jsonl and metrics.csv, the library log, a file it replaces); the user's file
the link points at stays as it was, and one sentence names the link. Reading: an input that is a device, a FIFO
or larger than what it is read into is one sentence before a byte is read (it hung, or was read until the
kernel killed gpt)."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest

from gptcli.errors import GptError
from in_process import gpt
from tiny_models import tiny_model_dir

USERS_TEXT = "the user's own notes\nline two\nline three\n"
LINK_SENTENCE = "is a symbolic link, which gptcli did not make; it never writes through a link"


@pytest.fixture
def notes(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(USERS_TEXT)
    return path


def link(at: Path, to: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(to)
    return at


def within(seconds: float, call):
    """call() on a thread; fails the test if it has not returned after `seconds` (a FIFO blocks for ever)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# --- no write through a link ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["gpt prepare", "gpt load-hf", "gpt export-hf"])
def test_the_lock_beside_an_output_is_never_written_through_a_link(tmp_path, notes, command):
    """`ln -s notes.txt .hf.gptcli-lock; gpt export-hf RUN --out hf`: the lock was opened with O_CREAT and
    without O_NOFOLLOW, truncated, and the notes held the lock's JSON. Every command that publishes a dir
    takes that lock (fsutil.output_lock)."""
    from gptcli.fsutil import output_lock

    lock = link(tmp_path / ".hf.gptcli-lock", notes)
    with pytest.raises(GptError, match=LINK_SENTENCE) as refused:
        with output_lock(tmp_path / "hf", command):
            pytest.fail("the lock was taken through the link")
    assert str(lock) in str(refused.value)
    assert notes.read_text() == USERS_TEXT and lock.is_symlink()


def test_export_hf_refuses_a_link_at_its_lock_and_writes_nothing(tmp_path, notes, monkeypatch, capsys):
    model_dir = tiny_model_dir(tmp_path / "model")
    link(tmp_path / ".hf.gptcli-lock", notes)
    code, said = gpt(monkeypatch, capsys, "export-hf", str(model_dir), "--out", str(tmp_path / "hf"))
    assert code == 1 and LINK_SENTENCE in said, said
    assert notes.read_text() == USERS_TEXT and not (tmp_path / "hf").exists()


def test_the_run_dirs_lock_is_never_written_through_a_link(tmp_path, notes):
    """The same through RUN/.gptcli-lock on `gpt train`: refused before anything is written."""
    from gptcli.train.launching.lock import RunDirClaim

    run_dir = tmp_path / "run"
    link(run_dir / ".gptcli-lock", notes)
    with RunDirClaim() as claim, pytest.raises(GptError, match=LINK_SENTENCE):
        claim.take(run_dir, 0)
    assert notes.read_text() == USERS_TEXT and sorted(p.name for p in run_dir.iterdir()) == [".gptcli-lock"]


@pytest.mark.parametrize("name", ["metrics.jsonl", "metrics.csv"])
def test_a_resume_never_truncates_or_appends_through_a_linked_metrics_file(tmp_path, notes, name):
    """RUN/metrics.jsonl a link to a user's file: a resume's truncate_metrics wrote through it and dropped the
    file's other lines ("dropped 2 unreadable line(s)")."""
    from gptcli.train.observing.metrics import MetricsWriter, truncate_metrics

    run_dir = tmp_path / "run"
    link(run_dir / name, notes)
    with pytest.raises(GptError, match=LINK_SENTENCE):
        truncate_metrics(run_dir, 3)
    with pytest.raises(GptError, match=LINK_SENTENCE):
        MetricsWriter(run_dir).close()
    assert notes.read_text() == USERS_TEXT


def test_the_library_log_is_never_appended_through_a_link(tmp_path, notes, monkeypatch):
    import logging

    from gptcli.train.observing import chatter

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # LibraryLog routes these: undone after
    for name in chatter.LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(chatter, "_active", None)
    LibraryLog = chatter.LibraryLog
    run_dir = tmp_path / "run"
    link(run_dir / "deepspeed.log", notes)
    with pytest.raises(GptError, match=LINK_SENTENCE):
        LibraryLog().settle(run_dir)
    assert notes.read_text() == USERS_TEXT


def test_a_file_gptcli_replaces_is_never_a_link(tmp_path, notes):
    """config.resolved.toml, trackers.json, `latest`, a loss plot: written beside and renamed onto the name,
    which would replace the user's link; refused instead."""
    from gptcli.fsutil import atomic_write_text

    target = link(tmp_path / "config.resolved.toml", notes)
    with pytest.raises(GptError, match=LINK_SENTENCE):
        atomic_write_text(target, "[project]\n")
    assert target.is_symlink() and notes.read_text() == USERS_TEXT
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --- no read without a bound ------------------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    os.mkfifo(path)
    return path


def test_a_hostfile_that_is_a_device_or_a_fifo_is_one_sentence(fifo):
    """`--hostfile /dev/zero` was read into memory until the kernel killed gpt at 17.5 GB (exit 137, nothing
    said); `--hostfile FIFO` blocked for ever."""
    from gptcli.train.launching.launch import read_hostfile

    for path, kind in ((Path("/dev/zero"), "a character device"), (fifo, "a FIFO")):
        with pytest.raises(GptError, match=f"The hostfile {path} is {kind}, not a regular file"):
            within(10, lambda path=path: read_hostfile(path))


def test_a_hostfile_far_larger_than_a_list_of_machines_is_one_sentence(tmp_path):
    from gptcli.train.launching.launch import read_hostfile

    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n" * 100_000)
    with pytest.raises(GptError, match=f"The hostfile {hosts} holds 1,800,000 bytes, more than the 1 MiB"):
        read_hostfile(hosts)


def test_a_project_file_that_is_a_fifo_is_one_sentence(fifo):
    """`--project FIFO` blocked for ever (every command reads the project through load_project)."""
    from gptcli.config import load_project

    with pytest.raises(GptError, match=f"Project file {fifo} is a FIFO, not a regular file"):
        within(10, lambda: load_project(fifo))


def test_eval_text_that_is_a_device_a_fifo_or_beyond_memory_is_one_sentence(tmp_path, fifo, monkeypatch):
    """`eval --text FIFO` blocked for ever; `eval --text /dev/urandom` read without end."""
    from gptcli import machine
    from gptcli.evaluate import text_tokens

    for path, kind in ((Path("/dev/urandom"), "a character device"), (fifo, "a FIFO")):
        with pytest.raises(GptError, match=f"Text file {path} is {kind}, not a regular file"):
            within(10, lambda path=path: text_tokens(path, tokenizer=None))
    text = tmp_path / "book.txt"
    text.write_text("a line of text\n" * 70_000)  # ~1 MB
    monkeypatch.setattr(machine, "available_memory", lambda device="cpu": 4 * 2**20)
    with pytest.raises(GptError, match="Tokenizing a text file of 1,050,000 bytes needs about .* more than the "
                                       "0.0 GiB this machine has free; score a shorter file"):
        text_tokens(text, tokenizer=None)


def test_prepare_names_a_device_or_a_fifo_for_what_it_is(fifo):
    """`gpt prepare /dev/zero` said "does not exist"."""
    from gptcli.data.sources import resolve_inputs

    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO")):
        with pytest.raises(GptError, match=f"Input {path} is {kind}, not a regular file"):
            within(10, lambda path=path: resolve_inputs([path]))


def test_task_data_that_is_a_fifo_is_one_sentence(tmp_path):
    from gptcli.tasks.data import read_local

    path = tmp_path / "hellaswag.jsonl"
    os.mkfifo(path)
    with pytest.raises(GptError, match=f"Task data {path} is a FIFO, not a regular file"):
        within(10, lambda: read_local(path))
