"""The run-dir lock: one holder at a time, named when refused; a dead holder's lock is taken over; a lock
of another host is never guessed at; every way out of a claim gives the lock back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import gpt_env
from gptcli.errors import GptError
from gptcli.rundir import LOCK_FILE
from gptcli.train.launching.lock import RunDirClaim, RunDirLock, check_usable

HOLD = textwrap.dedent("""
    import sys, time
    from gptcli.train.launching.lock import RunDirLock
    RunDirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, as rank 0 of a running `gpt train` does."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=gpt_env(), stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    yield run_dir, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_the_lock_names_its_holder_and_is_removed_on_release(tmp_path):
    lock = RunDirLock(tmp_path)
    assert lock.acquire() is None
    content = json.loads((tmp_path / LOCK_FILE).read_text())
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname() and content["started"]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    lock.release()  # a second release is harmless


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_host(holder):
    run_dir, process = holder
    with pytest.raises(GptError) as refused:
        RunDirLock(run_dir).acquire()
    message = str(refused.value)
    assert "in use by another gpt train" in message
    assert f"pid {process.pid} on host {socket.gethostname()}" in message
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == process.pid  # the holder's lock is untouched


def test_the_lock_of_a_killed_holder_is_taken_over_with_a_note(holder):
    run_dir, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / LOCK_FILE).exists()  # kill -9 leaves the file behind
    lock = RunDirLock(run_dir)
    note = lock.acquire()
    assert note and "took over" in note and f"pid {process.pid}" in note and "no longer running" in note
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_file_of_a_dead_pid_without_a_flock_is_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    lock = RunDirLock(tmp_path)
    assert f"pid {dead.pid}" in lock.acquire()
    lock.release()


def test_a_lock_of_another_host_is_refused_and_says_which_file_to_delete(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "yesterday"}))
    with pytest.raises(GptError) as refused:
        RunDirLock(tmp_path).acquire()
    message = str(refused.value)
    assert "pid 4242 on host node-17" in message and f"delete {tmp_path / LOCK_FILE}" in message
    assert "node-17" in (tmp_path / LOCK_FILE).read_text()


def test_a_claim_gives_the_lock_back_when_its_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDirClaim() as claim:
            claim.take(tmp_path / "run", rank=0)
            assert (tmp_path / "run" / LOCK_FILE).exists()
            raise RuntimeError("a failure after the lock was taken")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert not (tmp_path / "run" / ".gptcli-probe").exists()


def test_only_rank_0_takes_the_lock(tmp_path):
    held = RunDirLock(tmp_path)
    held.acquire()  # as a running rank 0 holds it
    with RunDirClaim() as claim:
        claim.take(tmp_path, rank=3)  # without torch.distributed a rank > 0 only checks the dir, never locks
        assert claim.lock is None
    held.release()


def test_a_run_dir_that_is_a_file_or_under_a_file_is_one_sentence(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(GptError, match="is a file, not a directory"):
        check_usable(a_file)
    with pytest.raises(GptError, match="Cannot create the run dir .*Not a directory"):
        check_usable(a_file / "run")
    assert a_file.read_text() == "mine"


def test_a_run_dir_without_write_permission_is_one_sentence(tmp_path, monkeypatch):
    # Tests run as root, which chmod does not stop; os.access is what the check asks (and it does report a
    # read-only file system to root).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(GptError, match="is not writable; choose a writable project.out_dir"):
        check_usable(tmp_path)
