"""DeepSpeed's CPU communication op build: a killed build leaves no process and no lock that blocks the next
run, and a wait says on the terminal what it waits for. The fast tests fake the build (a process working
in the build dir, torch's lock file); one slow test kills a real build."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import gpt_env, train_env
from gptcli.locks import FileLock
from gptcli.train.launching import opbuild


def wait_until(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_lock_of_a_killed_build_is_removed_with_a_note(tmp_path):
    """kill -9 mid-build left TORCH_EXTENSIONS_DIR/.../deepspeed_shm_comm/lock; every later run waited for ever."""
    lock = tmp_path / opbuild.TORCH_LOCK
    lock.write_text("")
    said = []
    opbuild.clear_torch_lock(tmp_path, said.append, stale_after=0.2, note_after=5, poll=0.05)
    assert not lock.exists()
    assert len(said) == 1 and "removed" in said[0] and "was killed (no process is building there)" in said[0]


def test_a_lock_left_beside_a_built_op_goes_without_a_note(tmp_path):
    """Every `gpt train` after the first said it "removed .../deepspeed_shm_comm/lock, left by a build ... that
    was killed": a lock beside a built op is a load's that ended without removing it; no build was killed."""
    (tmp_path / f"{opbuild.OP_NAME}.so").write_bytes(b"\x7fELF")
    lock = tmp_path / opbuild.TORCH_LOCK
    lock.write_text("")
    said = []
    opbuild.clear_torch_lock(tmp_path, said.append, stale_after=0.2, note_after=5, poll=0.05)
    assert not lock.exists() and said == []


def test_a_process_holding_the_lock_open_is_waited_for_wherever_it_works(tmp_path):
    """torch's FileBaton keeps its lock open while it builds or checks the op; its process need not work in the
    build dir."""
    lock = tmp_path / opbuild.TORCH_LOCK
    lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); time.sleep(30)",
                               str(lock)], cwd="/")
    try:
        assert wait_until(lambda: opbuild.holders_of(lock) != [], 10)
        said = []
        cleared = threading.Thread(target=opbuild.clear_torch_lock, args=(tmp_path, said.append),
                                   kwargs={"stale_after": 0.2, "note_after": 0.3, "poll": 0.05}, daemon=True)
        cleared.start()
        assert wait_until(lambda: len(said) == 1, 10) and f"pid {holder.pid}" in said[0] and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    cleared.join(10)
    assert not cleared.is_alive() and not lock.exists()


def test_a_live_build_is_waited_for_saying_who_it_is(tmp_path):
    lock = tmp_path / opbuild.TORCH_LOCK
    lock.write_text("")
    builder = subprocess.Popen(["sleep", "30"], cwd=tmp_path)  # as ninja and the compiler work in the build dir
    said, done = [], threading.Event()

    def clear():
        opbuild.clear_torch_lock(tmp_path, said.append, stale_after=0.2, note_after=0.3, poll=0.05)
        done.set()

    threading.Thread(target=clear, daemon=True).start()
    try:
        assert wait_until(lambda: len(said) == 1, 10)
        assert f"waiting for a build of DeepSpeed's CPU communication op in {tmp_path}: pid {builder.pid} (sleep)" in said[0]
        assert lock.exists() and not done.is_set()
    finally:
        builder.kill()
        builder.wait()
    assert done.wait(10) and not lock.exists()  # its builder gone: a killed build's lock, removed
    assert "removed" in said[-1]


HOLD = textwrap.dedent("""
    import sys, time
    from gptcli.locks import FileLock
    from pathlib import Path
    path = Path(sys.argv[1])
    FileLock(path, path.parent, "gpt train", where=str(path.parent), instead="x").acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_another_gptcli_build_is_waited_for_with_a_line_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / opbuild.GPTCLI_LOCK), "1.5"], env=gpt_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said = []
    lock = FileLock(tmp_path / opbuild.GPTCLI_LOCK, tmp_path, "gpt train", where=str(tmp_path), instead="x")
    opbuild.acquire_waiting(lock, said.append, "another gpt train that is building the op", note_after=0.3, poll=0.05)
    holder.wait()
    assert said and "waiting for another gpt train that is building the op" in said[0]
    assert f"pid {holder.pid}" in said[0] and str(lock.path) in said[0]
    lock.release()


# A stand-in for the helper's build: it takes torch's lock and starts a long "compiler" in the build dir,
# in the helper's own process group, with the helper's real signal handling.
FAKE_HELPER = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    from gptcli.train.launching import opbuild
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, opbuild.stop_the_build)
    directory = Path(sys.argv[1])
    (directory / opbuild.TORCH_LOCK).write_text("")
    compiler = subprocess.Popen(["sleep", "300"], cwd=directory)
    (directory / "compiler.pid").write_text(str(compiler.pid))
    time.sleep(300)
""")

START_BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from gptcli.train.launching import opbuild
    opbuild.HELPER = [sys.executable, "-c", sys.argv[2]]
    print("building", flush=True)
    opbuild.build_in_helper(Path(sys.argv[1]))
""")


# SIGKILL in the fast tier; Ctrl-C and SIGTERM, which the helper handles the same way, in the full suite
@pytest.mark.parametrize("stop", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                  pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_stopped_build_leaves_no_process_and_no_lock(tmp_path, stop):
    """kill -9 of `gpt train` mid-build left ninja and cc1plus running for minutes under PID 1; Ctrl-C is the
    likely way in. The helper that builds dies with its parent and takes its compilers and lock with it."""
    import psutil

    trainer = subprocess.Popen([sys.executable, "-c", START_BUILD, str(tmp_path), FAKE_HELPER], env=gpt_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert trainer.stdout.readline().strip() == "building"
    assert wait_until(lambda: (tmp_path / "compiler.pid").is_file() and (tmp_path / opbuild.TORCH_LOCK).exists())
    compiler = psutil.Process(int((tmp_path / "compiler.pid").read_text()))
    helper = psutil.Process(compiler.ppid())
    trainer.send_signal(stop)
    trainer.wait(timeout=30)
    gone, alive = psutil.wait_procs([helper, compiler], timeout=15)
    assert not alive, [p.as_dict(["pid", "name", "ppid"]) for p in alive]
    assert not (tmp_path / opbuild.TORCH_LOCK).exists()
    assert opbuild.processes_in(tmp_path) == []
    assert trainer.returncode != 0


def test_the_op_is_not_rebuilt_once_built(tmp_path, monkeypatch):
    (tmp_path / f"{opbuild.OP_NAME}.so").write_bytes(b"\x7fELF")
    (tmp_path / opbuild.BUILD_STAMP).write_text(json.dumps(opbuild.build_environment()))
    monkeypatch.setattr(opbuild, "build_in_helper", lambda directory: pytest.fail("rebuilt"))
    said = []
    opbuild.prepare_cpu_comm_op(said.append, tmp_path)
    assert said == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{opbuild.OP_NAME}.so",
                                                                                 opbuild.BUILD_STAMP])


@pytest.mark.parametrize("stamp", [None, "torch_dir"])
def test_an_op_built_for_another_environment_is_rebuilt_by_the_helper_saying_why(tmp_path, monkeypatch, stamp):
    """A second virtual environment sharing torch's build dir (it is per Python version): the op there was
    built with the other torch's include dirs, and DeepSpeed rebuilt it inside its own start, 18 s without a
    word and outside the helper that makes a kill safe. The helper rebuilds it (here a stand-in), with a
    line saying why, and the stamp names this environment afterwards. No stamp: built outside gptcli."""
    (tmp_path / f"{opbuild.OP_NAME}.so").write_bytes(b"\x7fELF")
    if stamp:
        (tmp_path / opbuild.BUILD_STAMP).write_text(json.dumps({**opbuild.build_environment(),
                                                                 stamp: "/another/venv/torch"}))
    built = []
    monkeypatch.setattr(opbuild, "build_in_helper", built.append)
    said = []
    assert not opbuild.op_built(tmp_path)
    opbuild.prepare_cpu_comm_op(said.append, tmp_path)
    assert built == [tmp_path] and len(said) == 1 and said[0].startswith("checking DeepSpeed's CPU communication op")
    assert ("torch_dir differ" if stamp else "built outside gptcli") in said[0]
    assert opbuild.stamp_of(tmp_path) == opbuild.build_environment() and opbuild.op_built(tmp_path)


SLOW_PROJECT = """\
[project]
out_dir = "{out}"
[data]
dir = "{data}"
[model]
preset = "nano"
[train]
max_steps = 1
micro_batch_size = 2
seq_len = 32
eval_every = 0
device = "cpu"
"""


@pytest.mark.slow
def test_kill_9_of_a_real_build_leaves_nothing_and_the_next_run_trains(tmp_path):
    """The real thing, in a throwaway TORCH_EXTENSIONS_DIR: kill -9 of `gpt train` while DeepSpeed's op
    compiles (planner.OP_BUILD_SECONDS), then a second `gpt train` builds it again and finishes."""
    import numpy as np

    from shard_fixture import write_shard_dir

    write_shard_dir(tmp_path / "data", [("train", np.arange(5000) % 50257)], vocab_size=50257,
                    fingerprint=load_fingerprint())
    (tmp_path / "run.toml").write_text(SLOW_PROJECT.format(out=tmp_path / "run", data=tmp_path / "data"))
    env = gpt_env({"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **train_env()})
    command = [sys.executable, "-m", "gptcli", "train", "--project", str(tmp_path / "run.toml")]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(command, env=env, stderr=err, stdout=subprocess.DEVNULL)
        build_dirs = lambda: [p for p in (tmp_path / "ext").rglob(opbuild.OP_NAME) if p.is_dir()]
        assert wait_until(lambda: any(opbuild.processes_in(d) for d in build_dirs()), 240), \
            (tmp_path / "first.err").read_text()[-2000:]
        first.send_signal(signal.SIGKILL)
        first.wait()
    directory = build_dirs()[0]
    # The helper stops ninja and the compilers first, then removes torch's lock: both, within seconds.
    lock = directory / opbuild.TORCH_LOCK
    assert wait_until(lambda: not opbuild.processes_in(directory) and not lock.exists(), 20), \
        (opbuild.processes_in(directory), lock.exists())
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building DeepSpeed's CPU communication op" in second.stderr and opbuild.op_built(directory)


def load_fingerprint() -> str:
    from gptcli.tokenizer import load_tokenizer

    return load_tokenizer("gpt2").fingerprint
