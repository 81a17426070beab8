"""Multi-rank training on the CPU (gloo), started every way a user starts it: `gpt train --nproc 2` (torch's
elastic launcher inside gpt), `torchrun -m gptcli train`, and processes carrying srun's or mpirun's
variables. ZeRO-2 and ZeRO-3 learn, resume bit for bit after a SIGKILL (and after a rank's file went missing,
both ranks falling back together); ZeRO-3 consolidates the fp32 masters; SIGTERM/SIGINT save and exit
143/130; a dead rank or a killed launcher leaves no rank running; two runs at once each get a port.

`gpt train --nproc 2` gets no MASTER_PORT here, as a user runs it: torch's rendezvous store binds a port the
OS picks and the ranks share it, so tests in parallel processes cannot pick the same one."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import (
    HANG_SECONDS,
    SMALL_BF16,
    gpt_env,
    losses,
    project_file,
    run_gpt,
    train,
    trained,
    wait_until,
    worker_ports,
)
from launchers import job_on_ports
from masters import assert_model_dir_holds_the_masters

pytestmark = pytest.mark.slow

# 16 steps of 2 ranks × 2 × 4 × 64 tokens take the loss from ln(50,257) ≈ 10.8 to about 6.9 (below 7.8 from
# step 13 on, in both ZeRO stages): the claim "learns" is that it falls by more than 3.
# Long enough and wide enough (micro batches of 4 × 64 tokens) for the loss to fall 3 nats below a fresh model's.
LEARN = ("train.max_steps=16", "train.warmup_steps=3", "train.eval_every=0", "train.checkpoint_every=5",
         "train.micro_batch_size=4", "train.seq_len=64")
SHORT = ("train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=2")
ENDLESS = ("train.max_steps=1000", "train.eval_every=0", "train.checkpoint_every=0")


def two_ranks(project: Path, *args: str, fault: str = ""):
    return train(project, *args, ranks=2, fault=fault)


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, env=gpt_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def gpt_train(project: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "gptcli", "train", "--project", str(project), *args]


def ranks_of(project: Path) -> list[psutil.Process]:
    """Live processes training `project` (the launcher included), found by their command line."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if str(project) in (process.info["cmdline"] or []) and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def assert_no_rank_left(project: Path) -> None:
    left = ranks_of(project)
    for process in left:  # do not leave them to the next test
        process.kill()
    assert not left, [p.pid for p in left]


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= steps, process, f"{steps} steps")


def assert_trained_on_two_ranks(run_dir: Path, steps: int) -> None:
    assert len(losses(run_dir)) == steps
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps:08d}"
    client = json.loads((run_dir / "checkpoints" / latest / "client_state.json").read_text())
    assert client["world_size"] == 2


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, shards) -> Path:
    """LEARN on 2 ranks at ZeRO-2, uninterrupted: checkpoints 5, 10, 15, 16. Read it, or copy it."""
    return trained(project_file(tmp_path_factory.mktemp("zero2"), shards, *LEARN), ranks=2)


# --- gpt train --nproc 2 ----------------------------------------------------------------------------------


def test_two_rank_zero2_learns_and_resumes_bit_for_bit_after_kill_9(tmp_path, shards, zero2_run):
    reference = losses(zero2_run)
    assert len(reference) == 16
    assert reference[-1] < math.log(50257) - 3.0
    project = project_file(tmp_path, shards, *LEARN, name="killed")
    killed = two_ranks(project, fault="kill@12@1")  # rank 1 dies after step 12; the last checkpoint is step 10
    assert killed.returncode != 0
    assert "rank 1 exited with code 137 (killed by SIGKILL)" in killed.stderr
    assert_no_rank_left(project)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    resumed = two_ranks(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == reference
    shards_of_optimizer = list((tmp_path / "killed" / "checkpoints" / "step_00000016").glob("*optim_states.pt"))
    assert len(shards_of_optimizer) == 2  # ZeRO-2: each rank saved its own partition


def test_two_ranks_fall_back_together_when_one_ranks_file_is_missing(tmp_path, shards, zero2_run):
    """Rank 1's RNG file of the latest checkpoint is gone: rank 0 sees it in the manifest, and both ranks
    resume from the previous checkpoint (rank 1 alone would have tried the latest), bit for bit."""
    shutil.copytree(zero2_run, tmp_path / "run")
    project = project_file(tmp_path, shards, *LEARN)
    (tmp_path / "run" / "checkpoints" / "step_00000016" / "rng_rank1.pt").unlink()
    resumed = two_ranks(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    message = " ".join(resumed.stderr.split())
    assert "checkpoint step_00000016 is damaged (rng_rank1.pt is missing); resuming from step_00000015" in message
    assert losses(tmp_path / "run") == losses(zero2_run)


@pytest.mark.parametrize("step", [1, 3])
def test_a_dead_rank_is_reported_once_by_the_launcher(tmp_path, shards, step):
    """kill -9 of rank 1: rank 0 printed "internal error: RuntimeError: [...gloo...] Connection closed by
    peer" (or "stopped by SIGTERM") before the launcher's report. Only the launcher speaks now, once."""
    killed = two_ranks(project_file(tmp_path, shards, *SHORT), fault=f"kill@{step}@1")
    assert killed.returncode == 137
    assert killed.stderr.count("Training failed: rank 1 exited with code 137 (killed by SIGKILL)") == 1
    for noise in ("internal error", "Traceback", "stopped by", "error:", "Connection closed", "RuntimeError",
                  "stopping after this step"):
        assert noise not in killed.stderr, killed.stderr[-3000:]


def test_two_rank_zero3_learns_and_consolidates(tmp_path, shards):
    """ZeRO-3 on 2 ranks learns; rank 0 alone prints the samples and the set-up (the library's warnings and
    build messages go to RUN/deepspeed.log); RUN/model is the fp32 master copy as DeepSpeed reads it, and
    exports to transformers."""
    from gptcli.modeldir import load_model_dir

    project = project_file(tmp_path, shards, *LEARN, "deepspeed.zero_stage=3", "train.sample_every=8",
                           "train.sample_tokens=8", name="z3")
    result = two_ranks(project)
    assert result.returncode == 0, result.stderr[-3000:]
    run_losses = losses(tmp_path / "z3")
    assert run_losses[-1] < math.log(50257) - 3.0
    assert result.stdout.count("--- sample at step") == 2  # steps 8 and 16, from rank 0 only
    assert "Warning" not in result.stderr and "built successfully" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("gpt train: model nano") == 1  # rank 0 speaks for both
    log = (tmp_path / "z3" / "deepspeed.log").read_text()
    assert log.count("built successfully") == 2 and "FutureWarning" in log
    assert len(list((tmp_path / "z3" / "checkpoints" / "step_00000016").glob("*optim_states.pt"))) == 2
    assert_model_dir_holds_the_masters(tmp_path / "z3", "fp32")
    loaded = load_model_dir(tmp_path / "z3")
    assert loaded.model.wte.weight.shape == (50257, 64)
    assert_exports_to_transformers(tmp_path / "z3", loaded, tmp_path / "z3-hf")


def test_two_rank_zero3_consolidates_the_fp32_master_copy(tmp_path, shards):
    """bf16 (SMALL_BF16's tokens): RUN/model holds the fp32 masters of both ranks' partitions, not the bf16
    copy (fp32: test_two_rank_zero3_learns_and_consolidates)."""
    project = project_file(tmp_path, shards, *SMALL_BF16, "deepspeed.zero_stage=3", "train.max_steps=2",
                           "train.eval_every=0")
    result = two_ranks(project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "run" / "checkpoints" / "step_00000002").glob("*optim_states.pt"))) == 2
    assert_model_dir_holds_the_masters(tmp_path / "run", "bf16")


def assert_exports_to_transformers(run_dir, loaded, hf_dir):
    """A ZeRO-3 run (weights partitioned across ranks while training) exports through `gpt export-hf RUN_DIR`
    to a dir transformers loads, with the same logits (fp32, atol 1e-4: logits of order 1-10, summed in
    another order by transformers' kernels) and the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = run_gpt("export-hf", run_dir, "--out", hf_dir)
    assert exported.returncode == 0, exported.stderr
    text = "ROMEO: What light through yonder window breaks?"
    ids = AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    assert ids == loaded.tokenizer.encode(text)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    batch = torch.tensor([ids])
    with torch.no_grad():
        theirs = reference(batch).logits
        ours, _ = loaded.model(batch)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_saves_on_every_rank_and_exits_128_plus_it(tmp_path, shards, signum):
    """kill / docker stop / Kubernetes / SLURM send SIGTERM, a terminal Ctrl-C sends SIGINT, to the launcher
    alone (the ranks run in their own session): both ranks finish the step, save it, and the launcher exits
    143 / 130."""
    project = project_file(tmp_path, shards, *ENDLESS, name="stop")
    process = start(gpt_train(project, "--nproc", "2"))
    wait_for_steps(process, tmp_path / "stop", 3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"Stopped by {signum.name}" in stderr
    assert stderr.count("stopping after this step") == 1  # rank 0 answered at once; no rank had failed
    steps = len(losses(tmp_path / "stop"))
    assert 3 <= steps < 1000
    assert_trained_on_two_ranks(tmp_path / "stop", steps)
    assert_no_rank_left(project)


def test_kill_9_of_the_launcher_leaves_no_rank_running(tmp_path, shards):
    project = project_file(tmp_path, shards, *ENDLESS, name="orphans")
    process = start(gpt_train(project, "--nproc", "2"))
    wait_for_steps(process, tmp_path / "orphans", 2)
    ranks = psutil.Process(process.pid).children()
    assert len(ranks) == 2
    process.kill()
    process.communicate(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=HANG_SECONDS)
    for rank in alive:
        rank.kill()
    assert not alive, [rank.pid for rank in alive]


def test_two_runs_started_together_each_get_a_free_port(tmp_path, shards):
    projects = [project_file(tmp_path, shards, *SHORT, name=name) for name in ("first", "second")]
    processes = [start(gpt_train(project, "--nproc", "2")) for project in projects]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    for name in ("first", "second"):
        assert_trained_on_two_ranks(tmp_path / name, 4)


# --- ranks started by other launchers --------------------------------------------------------------------


def test_torchrun_module_trains_and_resumes(tmp_path, shards):
    """`torchrun --standalone --nproc_per_node 2 -m gptcli train ...` as the docs give it."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptcli",
                "train"]
    project = project_file(tmp_path, shards, *SHORT, name="torchrun")
    first = subprocess.run([*torchrun, "--project", str(project)], env=gpt_env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_trained_on_two_ranks(tmp_path / "torchrun", 4)
    second = subprocess.run([*torchrun, "--project", str(project), "--set", "train.max_steps=6", "--resume", "required"],
                            env=gpt_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 4" in second.stderr
    assert_trained_on_two_ranks(tmp_path / "torchrun", 6)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_processes_with_a_cluster_launchers_variables_train_as_two_ranks(tmp_path, shards, launcher):
    """Two plain processes given exactly what srun (a job step over `localhost`) or Open MPI's mpirun sets, for
    a job whose port (derived from the job's id) is one of this test process's own."""
    project = project_file(tmp_path, shards, *SHORT, name=launcher)
    processes = [start(gpt_train(project), env) for env in job_on_ports(launcher, worker_ports())]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert_trained_on_two_ranks(tmp_path / launcher, 4)


def test_two_rank_zero3_overfit_batch_finishes_and_shows_the_batch(tmp_path, shards):
    """Under ZeRO-3 every rank must run the final forward (its weights are gathered from all of them)."""
    overfit = ("train.max_steps=6", "train.eval_every=0", "train.warmup_steps=0", "model.dropout=0.0",
               "deepspeed.zero_stage=3")
    result = two_ranks(project_file(tmp_path, shards, *overfit), "--overfit-batch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("overfit batch: final loss") == 1  # rank 0 prints it, once
    assert "predicted" in result.stdout
