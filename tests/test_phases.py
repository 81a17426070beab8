"""Feedback while `gpt train` waits (set-up phases, the stop acknowledgement) and library chatter kept in
RUN/deepspeed.log (gptcli.train.observing.phases, gptcli.train.launching.stopping, gptcli.train.observing.chatter)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from conftest import gpt_env
from gptcli import rundir
from gptcli.train.launching import stopping
from gptcli.train.observing import chatter, phases


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def test_a_phase_is_one_line_with_the_seconds_since_the_start(capfd):
    phases.show_phase("building the model", clock=lambda: phases.STARTED + 12.34)
    assert capfd.readouterr().err == "[   12.3s] building the model\n"


def test_the_op_build_time_is_one_figure_the_plan_the_phase_line_and_the_docs_state(monkeypatch, tmp_path):
    from conftest import REPO
    from gptcli.planner import plan
    from gptcli.train.launching import opbuild

    measured = plan.OP_BUILD_SECONDS
    for page in ("README.md", "docs/training.md"):
        assert f"about {measured:.0f} s on 2 idle cores" in " ".join((REPO / page).read_text().split())
    monkeypatch.setattr(plan, "OP_BUILD_SECONDS", 123.0)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    assert "about 123 s on 2 idle cores" in phases.deepspeed_phase("cpu")
    assert opbuild.build_time() == "about 123 s on 2 idle cores"  # the build's own line
    assert 123.0 in plan.startup_seconds("cpu", compile_model=False, op_build_pending=True).values()


def test_other_ranks_show_no_phase(capfd, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    phases.show_phase("building the model")
    assert capfd.readouterr().err == ""


def test_the_deepspeed_phase_warns_of_the_op_a_first_cpu_run_compiles(monkeypatch, tmp_path):
    """It looks where opbuild.py builds the op (torch's build dir), and states the planner's measured figure."""
    from gptcli.planner import OP_BUILD_SECONDS
    from gptcli.train.launching import opbuild

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert (f"compiles DeepSpeed's CPU communication op, about {OP_BUILD_SECONDS:.0f} s on 2 idle cores"
            in phases.deepspeed_phase("cpu"))
    (opbuild.build_directory() / "deepspeed_shm_comm.so").write_bytes(b"")
    assert "compiles DeepSpeed's CPU communication op" in phases.deepspeed_phase("cpu")  # whose build is unknown
    (opbuild.build_directory() / opbuild.BUILD_STAMP).write_text(json.dumps(opbuild.build_environment()))
    assert phases.deepspeed_phase("cpu") == "starting DeepSpeed (gloo)"
    assert phases.deepspeed_phase("cuda") == "starting DeepSpeed (NCCL)"


def acknowledger(step: int, now: list[float]) -> stopping.StopAcknowledger:
    return stopping.StopAcknowledger(SimpleNamespace(step=step), handler=None, clock=lambda: now[0])


def test_a_stop_request_is_acknowledged_with_the_step_in_progress(capfd):
    acknowledger(step=6, now=[0.0])(signal.SIGINT)
    err = capfd.readouterr().err
    assert "Ctrl-C: stopping after this step (step 7); saving a checkpoint…" in err
    assert "press Ctrl-C again to abort without saving" in err
    acknowledger(step=0, now=[0.0])(signal.SIGTERM)
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after this step (step 1); saving a checkpoint…" in err and "Ctrl-C again" not in err


def test_a_survivor_of_a_failed_rank_leaves_the_report_to_its_launcher(capfd, monkeypatch, tmp_path):
    """The launcher marks a failed rank before it sends the others SIGTERM: no "saving a checkpoint" then,
    which no rank could do with a peer gone; before the mark exists, a SIGTERM is the user's and answered."""
    marker = tmp_path / "a-rank-failed"
    monkeypatch.setenv(stopping.PEER_FAILED_VARIABLE, str(marker))
    acknowledger(step=3, now=[0.0])(signal.SIGTERM)
    assert "stopping after this step (step 4)" in capfd.readouterr().err
    marker.touch()
    acknowledger(step=3, now=[0.0])(signal.SIGTERM)
    assert capfd.readouterr().err == ""


def test_a_repeated_signal_within_a_second_is_the_same_request(capfd):
    now = [100.0]
    answer = acknowledger(step=2, now=now)
    answer(signal.SIGINT)
    now[0] += 0.2  # the terminal's SIGINT and a launcher's forwarded copy of it
    answer(signal.SIGINT)  # an abort would end the test run
    now[0] += 5.0
    answer(signal.SIGTERM)  # only Ctrl-C aborts
    assert capfd.readouterr().err.count("stopping after this step") == 1


STOP_SCRIPT = """
import hashlib, os, signal, sys, threading, time
from types import SimpleNamespace
from gptcli.train.loop import StopRequest
from gptcli.train.observing.phases import training_starts
from gptcli.train.launching.stopping import REPEAT_SIGNAL_SECONDS
stop = StopRequest()
stop.install()
training_starts(SimpleNamespace(step=4, project=SimpleNamespace(train=SimpleNamespace(max_steps=10))), stop)
# The main thread inside one C call that runs no Python handler, as in a CPU backward pass: a read of a pipe
# that only the acknowledgement (written to fd 2) can end, with SIGINT blocked in this thread so the read is
# not interrupted either. An answer that waited for the main thread would never come: the read would hang.
terminal, (answers, fd2) = os.dup(2), os.pipe()
os.dup2(fd2, 2)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
os.kill(os.getpid(), signal.SIGINT)
answer = os.read(answers, 4096)
os.dup2(terminal, 2)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # Python's own handler runs now, after the answer
print(f"read inside the C call: {answer.decode()!r}", file=sys.stderr, flush=True)
if len(sys.argv) > 1:  # a second Ctrl-C, later than a repeat of the first one could be (REPEAT_SIGNAL_SECONDS)
    time.sleep(max(0.0, stop.acknowledger.first_at + REPEAT_SIGNAL_SECONDS + 0.2 - time.monotonic()))
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    hashlib.pbkdf2_hmac("sha256", b"a long C call", b"salt", 2_000_000)
print("not aborted", file=sys.stderr)
"""


def run_stop_script(*args: str) -> subprocess.CompletedProcess:
    """The real handler (StopRequest in the training loop) and the watcher, in a process of their own."""
    return subprocess.run([sys.executable, "-c", STOP_SCRIPT, *args], env=gpt_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_a_stop_is_acknowledged_while_the_main_thread_is_inside_a_c_call():
    result = run_stop_script()
    assert result.returncode == 0, result.stderr
    inside = result.stderr.split("read inside the C call: ")[1].splitlines()[0]
    assert "Ctrl-C: stopping after this step (step 5)" in inside, result.stderr
    assert result.stderr.count("stopping after this step") == 1, result.stderr  # the handler did not answer again


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once():
    result = run_stop_script("again")
    assert result.returncode == 128 + signal.SIGINT, result
    assert "Aborting now, without saving" in result.stderr and "not aborted" not in result.stderr


def test_library_output_goes_to_the_run_log_while_deepspeed_starts(tmp_path, capfd):
    run_dir = tmp_path / "run"
    with chatter.library_output_to(run_dir):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a compiler's complaint", file=sys.stderr)
        os.system("echo a child process line; echo its error line >&2")
    print("gptcli's own line")
    captured = capfd.readouterr()
    assert captured.out == "gptcli's own line\n" and captured.err == ""
    log = (run_dir / rundir.LIBRARY_LOG).read_text()
    for line in ("built successfully", "a compiler's complaint", "a child process line", "its error line"):
        assert line in log


def test_deepspeed_logs_and_torch_distributed_warnings_stay_in_the_log(tmp_path):
    """In a process of its own: pytest's warning capture would stand in for the one a user's process has."""
    script = textwrap.dedent("""
        import logging, sys, warnings
        from pathlib import Path
        from gptcli.train.observing import chatter
        logging.getLogger("DeepSpeed").addHandler(logging.StreamHandler(sys.stdout))  # as DeepSpeed does
        with chatter.library_output_to(Path(sys.argv[1])):
            pass
        logging.getLogger("DeepSpeed").warning("a DeepSpeed warning after set-up")
        library = str(Path("site-packages", "torch", "distributed", "c10d_logger.py").resolve())
        for _ in range(2):
            warnings.warn_explicit("`all_gather_into_tensor` is deprecated", FutureWarning, library, 83)
        warnings.warn_explicit("a warning of gptcli's own", UserWarning, "gptcli/train/loop.py", 1)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=gpt_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "all_gather_into_tensor" not in result.stderr
    assert "a warning of gptcli's own" in result.stderr
    log = (tmp_path / rundir.LIBRARY_LOG).read_text()
    assert "a DeepSpeed warning after set-up" in log and "all_gather_into_tensor" in log


# --- as a user sees it ---------------------------------------------------------------------------------------


def train_overrides(tmp_path, shards, *extra: str) -> list[str]:
    """`gpt train` without a project file: every setting on the command line (conftest's session shards)."""
    settings = [f'data.dir="{shards}"', f'project.out_dir="{tmp_path / "run"}"', "model.preset=nano",
                "train.max_steps=6", "train.micro_batch_size=2", "train.eval_every=0", "train.warmup_steps=1",
                'train.device="cpu"', *extra]
    return [f"--set={setting}" for setting in settings]


@pytest.mark.slow
def test_train_says_what_it_will_do_shows_each_phase_and_acknowledges_sigterm(tmp_path, shards):
    from conftest import run_gpt, train_env

    (tmp_path / "run.toml").write_text("")  # a project file, so the built-in defaults line is not expected
    result = run_gpt("train", *train_overrides(tmp_path, shards), cwd=tmp_path, env=train_env(fault="sigterm@3"))
    assert result.returncode == 143, result.stderr[-3000:]
    err = result.stderr
    # The estimate's length depends on whether DeepSpeed's CPU op is built for this Python environment yet.
    order = ["gpt train: model nano, 3,320,640 parameters (3.3M) on the CPU, fp32, ZeRO stage 1, 1 rank",
             "128 tokens per step × 6 steps = 768 tokens", "estimate: ",
             "s] loading DeepSpeed", f"s] reading the shards in {shards}", "s] building the model",
             "s] starting DeepSpeed (gloo)", "s] training: step 1 of 6 is running",
             "SIGTERM: stopping after this step (step 3); saving a checkpoint…", "step 3/6",
             "Finished at step 3 (stopped by signal 15)"]
    positions = [err.find(fragment) for fragment in order]
    assert -1 not in positions and positions == sorted(positions), list(zip(order, positions, strict=True))
    assert "no run.toml" not in err
    # DeepSpeed's chatter is in the run's log, not in front of the user
    assert result.stdout == ""
    assert "built successfully" not in err and "[WARNING]" not in err and "[INFO]" not in err
    assert "built successfully" in (tmp_path / "run" / "deepspeed.log").read_text()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


@pytest.mark.slow
def test_train_without_a_project_file_names_the_defaults_it_uses(tmp_path, shards):
    from conftest import run_gpt, train_env

    result = run_gpt("train", *train_overrides(tmp_path, shards, "model.preset=tiny", "train.max_steps=1"),
                     cwd=tmp_path, env=train_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no run.toml: using the built-in defaults, model tiny, data from {shards}" in result.stderr
