"""`gpt train` on the CPU through DeepSpeed: exact resume, faults, consolidation, the overfit check.

One-rank runs of the nano preset over tinyshakespeare shards; each run is a fresh `python -m gptcli`
process, as a user's. The multi-rank runs are in test_train_distributed.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_gpt
from shard_fixture import make_shards

# dropout > 0 so that exact resume must also restore the dropout RNG; accumulation 2 so that resume
# must land between optimizer steps, not micro steps.
PROJECT = """\
[project]
out_dir = "{out}"
seed = 1234
[data]
dir = "{data}"
[model]
preset = "nano"
dropout = 0.1
[train]
max_steps = 8
micro_batch_size = 4
grad_accum_steps = 2
seq_len = 64
lr = 3e-3
warmup_steps = 2
checkpoint_every = 3
eval_every = 4
eval_batches = 2
[deepspeed]
zero_stage = 2
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import SHAKESPEARE

    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/corpora/tinyshakespeare.txt is not present")
    return make_shards(SHAKESPEARE, tmp_path_factory.mktemp("shards"))


def project_file(directory: Path, shards: Path, name: str = "run", extra: str = "") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(PROJECT.format(out=directory / name, data=shards) + extra)
    return path


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def train(project: Path, *args: str, fault: str = "") -> object:
    return run_gpt("train", "--project", project, *args, env={"GPTCLI_FAULT": fault} if fault else None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    directory = tmp_path_factory.mktemp("reference")
    result = train(project_file(directory, shards))
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "run"


def test_an_uninterrupted_run_leaves_a_complete_run_dir(reference):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed"):
        assert key in records[0]
    assert records[0]["loss"] == pytest.approx(math.log(50257), abs=0.3)  # a fresh model: ln(vocab)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert records[-1]["tokens"] == 8 * 2 * 4 * 64 and records[0]["mfu"] is None  # no peak on a CPU
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in (reference / "checkpoints").glob("step_*")) == [
        "step_00000003", "step_00000006", "step_00000008"]
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "zero_stage = 2" in (reference / "config.resolved.toml").read_text()
    assert (reference / "metrics.csv").read_text().count("\n") == 9


def test_consolidated_weights_give_the_engines_eval_loss(reference, shards):
    from gptcli.data.loader import BatchLoader
    from gptcli.data.shards import open_prepared
    from gptcli.modeldir import load_model_dir

    engine_loss = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    loaded = load_model_dir(reference)  # the run dir resolves to RUN/model
    assert loaded.config.n_layer == 2 and loaded.tokenizer.fingerprint.startswith("gpt2:")
    val = BatchLoader(open_prepared(shards), "val", 4, 64, shuffle=False)
    with torch.no_grad():
        batch_losses = [loaded.model(x, y)[1].item() for x, y in val.sequential_batches(2)]
    assert sum(batch_losses) / len(batch_losses) == pytest.approx(engine_loss, rel=1e-6)


def test_kill_9_and_resume_reproduces_the_losses_bit_for_bit(tmp_path, shards, reference):
    project = project_file(tmp_path, shards)
    killed = train(project, fault="kill@5")
    assert killed.returncode in (-9, 137)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert losses(tmp_path / "run") == losses(reference)


def test_a_crash_mid_save_falls_back_and_a_chained_resume_stays_exact(tmp_path, shards, reference):
    project = project_file(tmp_path, shards)
    crashed = train(project, fault="crash_in_save@6")
    assert crashed.returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"  # the partial step 6 is not named
    killed = train(project, fault="kill@7")  # resumes from 3, saves 6 again, dies after 7
    assert killed.returncode in (-9, 137)
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    finished = train(project)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference)


def test_resume_required_without_a_checkpoint_fails(tmp_path, shards):
    result = train(project_file(tmp_path, shards), "--resume", "required")
    assert_user_error(result, "--resume required", "no complete checkpoint")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_another_architecture_names_the_key_and_both_values(tmp_path, shards, reference):
    project = tmp_path / "other.toml"
    project.write_text(PROJECT.format(out=reference, data=shards).replace('preset = "nano"', 'preset = "nano"\nn_layer = 3'))
    result = train(project, "--resume", "required")
    assert_user_error(result, "model.n_layer", "3", "2")


def test_a_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path, shards, reference):
    from gptcli.train.checkpoint import full_state_dict

    result = train(project_file(tmp_path, shards), fault="nan@7")
    assert result.returncode == 4
    assert_user_error(result, "step 7", "before the optimizer step", "the loss is nan", "step_00000006")
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not (run / "checkpoints" / "step_00000007").exists()
    assert len(losses(run)) == 6
    saved, expected = full_state_dict(run, "step_00000006"), full_state_dict(reference, "step_00000006")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_overfit_batch_drives_the_loss_to_zero_and_shows_tokens(tmp_path, shards):
    project = project_file(tmp_path, shards, extra="")
    text = project.read_text().replace("max_steps = 8", "max_steps = 90").replace("dropout = 0.1", "dropout = 0.0")
    text = text.replace("grad_accum_steps = 2", "grad_accum_steps = 1").replace("seq_len = 64", "seq_len = 32")
    text = text.replace("warmup_steps = 2", "warmup_steps = 0\nlr_schedule = \"constant\"\nweight_decay = 0.0")
    project.write_text(text.replace("zero_stage = 2", "zero_stage = 0"))
    result = train(project, "--overfit-batch")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "overfit-batch" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["loss"] < 0.1
    assert "input" in result.stdout and "target" in result.stdout and "predicted" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 16
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_batch_settings_are_one_sentence(tmp_path, shards):
    project = project_file(tmp_path, shards, extra="")
    result = train(project, "--set", "train.global_batch_tokens=1000")
    assert_user_error(result, "train.global_batch_tokens", "not a multiple")
    result = train(project, "--resume", "sometimes")
    assert result.returncode == 2


def test_gpt_plot_draws_a_run_and_refuses_an_empty_dir(tmp_path, reference):
    result = run_gpt("plot", reference, "--out", tmp_path / "curve.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert_user_error(run_gpt("plot", tmp_path), "no steps to plot")
    assert_user_error(run_gpt("plot", tmp_path / "nowhere"), "Run dir", "does not exist")


def test_zero3_kill_9_and_resume_is_exact_too(tmp_path, shards):
    """ZeRO-3 partitions the weights themselves; resume must restore them and the optimizer exactly."""
    zero3 = "zero_stage = 3"
    whole = project_file(tmp_path, shards, "whole")
    whole.write_text(whole.read_text().replace("zero_stage = 2", zero3))
    assert train(whole).returncode == 0
    project = project_file(tmp_path, shards, "killed")
    project.write_text(project.read_text().replace("zero_stage = 2", zero3))
    assert train(project, fault="kill@5").returncode in (-9, 137)
    resumed = train(project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
