"""Multi-rank `gpt train --nproc 2` on the CPU (gloo): ZeRO-2 and ZeRO-3 learn, exact resume across a
SIGKILL, and SIGTERM → every rank saves and the run exits 143."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from conftest import gpt_env, run_gpt
from test_train import PROJECT, losses, shards  # noqa: F401  (the module-scoped shards fixture)

pytestmark = pytest.mark.slow

LEARN = {"max_steps = 8": "max_steps = 30", "warmup_steps = 2": "warmup_steps = 3", "eval_every = 4": "eval_every = 0",
         "checkpoint_every = 3": "checkpoint_every = 10"}


def project_file(directory, shards, name="run", replace=None, zero_stage=2):
    text = PROJECT.format(out=directory / name, data=shards).replace("zero_stage = 2", f"zero_stage = {zero_stage}")
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def train(project, *args, fault=""):
    return run_gpt("train", "--project", project, "--nproc", "2", *args,
                   env={"GPTCLI_FAULT": fault} if fault else None)


def test_two_rank_zero2_learns_and_resumes_bit_for_bit_after_kill_9(tmp_path, shards):
    whole = train(project_file(tmp_path, shards, "whole", LEARN))
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = losses(tmp_path / "whole")
    assert len(reference) == 30
    assert reference[-1] < math.log(50257) - 3.0  # from 10.8 to below 7.8 in 30 steps of 2 × 2 × 4 × 64 tokens
    project = project_file(tmp_path, shards, "killed", LEARN)
    killed = train(project, fault="kill@14@1")  # rank 1 dies after step 14; the last checkpoint is step 10
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == reference
    shards_of_optimizer = list((tmp_path / "killed" / "checkpoints" / "step_00000030").glob("*optim_states.pt"))
    assert len(shards_of_optimizer) == 2  # ZeRO-2: each rank saved its own partition


def test_two_rank_zero3_learns_and_consolidates(tmp_path, shards):
    from gptcli.modeldir import load_model_dir

    result = train(project_file(tmp_path, shards, "z3", LEARN, zero_stage=3))
    assert result.returncode == 0, result.stderr[-3000:]
    run_losses = losses(tmp_path / "z3")
    assert run_losses[-1] < math.log(50257) - 3.0
    loaded = load_model_dir(tmp_path / "z3")
    assert loaded.model.wte.weight.shape == (50257, 64)
    assert_exports_to_transformers(tmp_path / "z3", loaded, tmp_path / "z3-hf")


def assert_exports_to_transformers(run_dir, loaded, hf_dir):
    """A ZeRO-3 run (weights partitioned across ranks while training) exports through `gpt export-hf RUN_DIR`
    to a dir transformers loads, with the same logits (fp32, atol 1e-4) and the same token ids."""
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


def test_sigterm_on_two_ranks_saves_and_exits_143(tmp_path, shards):
    project = project_file(tmp_path, shards, "term", {"max_steps = 8": "max_steps = 1000", "eval_every = 4": "eval_every = 0",
                                                      "checkpoint_every = 3": "checkpoint_every = 0"})
    process = subprocess.Popen([sys.executable, "-m", "gptcli", "train", "--project", str(project), "--nproc", "2"],
                               env=gpt_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or metrics.read_text().count("\n") < 3):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    steps = len(losses(tmp_path / "term"))
    assert 3 <= steps < 1000
    latest = (tmp_path / "term" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps:08d}"
    client = json.loads((tmp_path / "term" / "checkpoints" / latest / "client_state.json").read_text())
    assert client["step"] == steps and client["world_size"] == 2
