"""`gpt train` on the CPU through DeepSpeed: exact resume, faults, consolidation, the overfit check.

One-rank runs of conftest's NANO_RUN (the nano preset over shards of the standard library's source); each run
is a fresh `python -m gptcli` process, as a user's. Tests that only need a finished run, or its losses, read or
copy conftest's session-wide reference run instead of training their own. The multi-rank runs are in
test_train_distributed.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import (
    NANO_RUN,
    SMALL_BF16,
    assert_user_error,
    copy_run,
    losses,
    project_file,
    records,
    run_gpt,
    train,
    trained,
    worker_port,
)
from gptcli.config import apply_overrides, project_from_dict
from masters import assert_model_dir_holds_the_masters

# The overfit check: one batch of 4 × 32 tokens, a constant lr and nothing that fights memorisation.
OVERFIT = ("train.max_steps=90", "model.dropout=0.0", "train.grad_accum_steps=1", "train.seq_len=32",
           "train.warmup_steps=0", 'train.lr_schedule="constant"', "train.weight_decay=0.0")


def test_an_uninterrupted_run_leaves_a_complete_run_dir(reference_run):
    run = records(reference_run)
    assert len(run) == 8
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed"):
        assert key in run[0]
    assert run[0]["loss"] == pytest.approx(math.log(50257), abs=0.3)  # a fresh model: ln(vocab)
    assert run[-1]["loss"] < run[0]["loss"] - 0.5
    assert run[-1]["tokens"] == 8 * 2 * 2 * 32 and run[0]["mfu"] is None  # steps × accumulation × 2 × 32; no CPU peak
    assert [r["step"] for r in run if "eval_loss" in r] == [4, 8]
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in (reference_run / "checkpoints").glob("step_*")) == [
        "step_00000003", "step_00000006", "step_00000008"]
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "zero_stage = 2" in (reference_run / "config.resolved.toml").read_text()
    assert (reference_run / "metrics.csv").read_text().count("\n") == 9


def test_consolidated_weights_give_the_engines_eval_loss(reference_run, shards):
    """The model dir's weights score the val windows the engine scored at the last step, to 1e-6 relative
    (the same fp32 forward; only the order of the batch means may differ)."""
    from gptcli.data.loader import BatchLoader
    from gptcli.data.shards import open_prepared
    from gptcli.modeldir import load_model_dir

    engine_loss = records(reference_run)[-1]["eval_loss"]
    loaded = load_model_dir(reference_run)  # the run dir resolves to RUN/model
    assert loaded.config.n_layer == 2 and loaded.tokenizer.fingerprint.startswith("gpt2:")
    val = BatchLoader(open_prepared(shards), "val", NANO_RUN["train"]["micro_batch_size"], NANO_RUN["train"]["seq_len"],
                      shuffle=False)
    with torch.no_grad():
        batch_losses = [loaded.model(x, y)[1].item() for x, y in val.sequential_batches(2)]
    assert sum(batch_losses) / len(batch_losses) == pytest.approx(engine_loss, rel=1e-6)


def test_kill_9_and_resume_reproduces_the_losses_bit_for_bit(tmp_path, shards, reference_run):
    """Killed after step 5, resumed from the checkpoint of step 3: the losses are the uninterrupted run's. The
    killed trainer's lock is left behind, and the resumed run takes it over with a note (the trainer that
    held it is no longer running)."""
    project = project_file(tmp_path, shards)
    killed = train(project, fault="kill@5")
    assert killed.returncode in (-9, 137)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert (run / ".gptcli-lock").exists()
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert "took over the lock" in resumed.stderr and "no longer running" in resumed.stderr
    assert not (run / ".gptcli-lock").exists()
    assert losses(run) == losses(reference_run)


@pytest.mark.slow
def test_a_crash_mid_save_falls_back_and_a_chained_resume_stays_exact(tmp_path, shards, reference_run):
    project = project_file(tmp_path, shards)
    crashed = train(project, fault="crash_in_save@6")
    assert crashed.returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"  # the partial step 6 is not named
    killed = train(project, fault="kill@7")  # resumes from 3, saves 6 again, dies after 7
    assert killed.returncode in (-9, 137)
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    trained(project)
    assert losses(tmp_path / "run") == losses(reference_run)


@pytest.mark.slow
def test_resume_required_without_a_checkpoint_fails(tmp_path, shards):
    result = train(project_file(tmp_path, shards), "--resume", "required")
    assert_user_error(result, "--resume required", "no complete checkpoint")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resuming_another_architecture_names_the_key_and_both_values(tmp_path, shards, reference_run):
    project = copy_run(reference_run, tmp_path, shards, "model.n_layer=3")
    result = train(project, "--resume", "required")
    assert_user_error(result, "model.n_layer", "3", "2")


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path, shards, reference_run):
    from gptcli.train.state.consolidation import full_state_dict

    result = train(project_file(tmp_path, shards), fault="nan@4")
    assert result.returncode == 4
    assert_user_error(result, "step 4", "before the optimizer step", "the loss is nan", "step_00000003")
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert len(losses(run)) == 3
    saved, expected = full_state_dict(run, "step_00000003"), full_state_dict(reference_run, "step_00000003")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_overfit_batch_drives_the_loss_to_zero_and_shows_tokens(tmp_path, shards):
    project = project_file(tmp_path, shards, *OVERFIT, "deepspeed.zero_stage=0")
    result = train(project, "--overfit-batch")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "overfit-batch" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["loss"] < 0.1
    assert "input" in result.stdout and "target" in result.stdout and "predicted" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 16
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_samples_never_consume_the_training_rng_and_a_run_with_samples_resumes_exactly(tmp_path, shards,
                                                                                        reference_run):
    """Dropout draws from the training RNG; a sample drawn in the middle of the run must leave it as it was.
    A run with a sample every 2 steps, killed after step 5 (samples at 2 and 4) and resumed from step 3
    (samples at 4, 6 and 8, which it shows), has the losses of the reference run, which draws none: the steps kept from before
    the kill and those after the resume alike. Its prompt ends in a space: the run says so once, at its start."""
    project = project_file(tmp_path, shards, "train.sample_every=2", "train.sample_tokens=8",
                           'train.sample_prompt="In my opinion, "')
    killed = train(project, fault="kill@5")
    assert killed.returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("--- sample at step") == 3
    assert " ".join(resumed.stderr.split()).count("note: train.sample_prompt ends in a space") == 1, resumed.stderr
    assert losses(tmp_path / "run") == losses(reference_run)


def test_the_run_notes_a_sample_prompt_that_ends_in_a_space_or_an_objective_without_samples():
    from gptcli.tokenizer import load_tokenizer
    from gptcli.train.loop import sample_note

    tokenizer = load_tokenizer("gpt2")

    def note(*overrides: str):
        return sample_note(project_from_dict(apply_overrides({}, ["train.sample_every=10", *overrides])), tokenizer)

    assert note('train.sample_prompt="def "').startswith('note: train.sample_prompt ends in a space, a token')
    assert note('train.sample_prompt="def"') is None and note() is None  # the default: "In my opinion,"
    assert note('train.sample_prompt="def "', "train.sample_every=0") is None  # no samples, nothing to say
    assert "prints no samples" in note('train.sample_prompt="def "', 'train.objective="masked_lm"')


def test_samples_during_training_follow_the_generate_section(capsys):
    """A training sample is what `gpt generate` picks with the project's [generate] (seeded by project seed +
    step), sample_tokens long; drawing it leaves the training RNG and the model's mode as they were."""
    from dataclasses import replace
    from types import SimpleNamespace

    from gptcli.generate import generate
    from gptcli.model import build_model
    from gptcli.objectives import NEXT_TOKEN
    from gptcli.tokenizer import load_tokenizer
    from gptcli.train.loop import print_sample

    tokenizer = load_tokenizer("gpt2")
    model_keys = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}
    samples = []
    for overrides in ([], ["generate.temperature=0"], ["generate.temperature=1.5", "generate.top_k=3",
                                                        "generate.top_p=0.5"]):
        raw = apply_overrides({"model": model_keys, "train": {"sample_tokens": 12}}, overrides)
        project = project_from_dict(raw)
        torch.manual_seed(0)
        model = build_model(project.model).train()
        run = SimpleNamespace(project=project, engine=SimpleNamespace(module=model), rank=0, device="cpu",
                              tokenizer=tokenizer, step=4, writer=None, objective=NEXT_TOKEN)
        rng = torch.get_rng_state()
        print_sample(run)
        assert torch.equal(torch.get_rng_state(), rng) and model.training
        shown = capsys.readouterr().out
        assert shown.startswith("--- sample at step 4 ---\nIn my opinion,") and shown.endswith("\n---\n")
        options = replace(project.generate, max_new_tokens=12, seed=project.project.seed + 4)
        expected = generate(model.eval(), tokenizer, ["In my opinion,"], options)[0]
        assert shown[len("--- sample at step 4 ---\nIn my opinion,"):-len("\n---\n")] == expected.text
        assert len(expected.tokens) == 12
        samples.append(expected.text)
    assert len(set(samples)) == 3  # each [generate] setting picked other tokens


def test_bad_batch_settings_are_one_sentence(tmp_path, shards):
    project = project_file(tmp_path, shards)
    result = train(project, "--set", "train.global_batch_tokens=1000")
    assert_user_error(result, "train.global_batch_tokens", "not a multiple")
    result = train(project, "--resume", "sometimes")
    assert result.returncode == 2


@pytest.mark.slow
def test_gpt_plot_draws_a_run_and_refuses_an_empty_dir(tmp_path, reference_run):
    result = run_gpt("plot", reference_run, "--out", tmp_path / "curve.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert_user_error(run_gpt("plot", tmp_path), "no steps to plot")
    assert_user_error(run_gpt("plot", tmp_path / "nowhere"), "Run dir", "does not exist")


@pytest.mark.slow
def test_zero3_kill_9_and_resume_is_exact_too(tmp_path, shards):
    """ZeRO-3 partitions the weights themselves; resume must restore them and the optimizer exactly. The
    uninterrupted run's model dir is also ZeRO-3's fp32 master copy on one rank (DeepSpeed's reading)."""
    whole = trained(project_file(tmp_path, shards, "deepspeed.zero_stage=3", name="whole"))
    assert_model_dir_holds_the_masters(whole, "fp32")
    project = project_file(tmp_path, shards, "deepspeed.zero_stage=3", name="killed")
    assert train(project, fault="kill@5").returncode in (-9, 137)
    resumed = trained(project)
    assert losses(resumed) == losses(whole)


# --- the consolidated model is the fp32 master copy -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision,stage", [("fp32", 0), ("bf16", 0), ("bf16", 1)])
def test_the_consolidated_model_is_deepspeeds_fp32_master_copy(tmp_path, shards, precision, stage):
    """Bit for bit (torch.equal) against DeepSpeed's own reading of the checkpoint, one rank, for each way
    DeepSpeed keeps the masters: fp32 ZeRO-0 (the module is the master copy), bf16 ZeRO-0 (its FP16
    optimizer's fp32 groups), bf16 ZeRO-1 (BF16_Optimizer's partitions). The ZeRO-1/2 optimizer, one class for
    both stages, is checked on the reference run (fp32, test_the_reference_runs_model_is_the_fp32_master_copy)
    and on the bf16 run of test_bf16_kill_9_and_resume_reproduces_the_losses_bit_for_bit; ZeRO-3 on the runs
    of test_zero3_kill_9_and_resume_is_exact_too and of the two-rank tests (test_train_distributed.py)."""
    small = SMALL_BF16 if precision == "bf16" else ()
    project = project_file(tmp_path, shards, *small, f'train.precision="{precision}"', f"deepspeed.zero_stage={stage}",
                           "train.max_steps=2", "train.eval_every=0")
    result = train(project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_model_dir_holds_the_masters(tmp_path / "run", precision)
    assert ("sums gradients in bf16" in result.stderr) == (precision == "bf16" and stage == 0)


@pytest.mark.slow
def test_the_reference_runs_model_is_the_fp32_master_copy(reference_run):
    """fp32 ZeRO-2 (DeepSpeed's ZeRO-1/2 optimizer), with no run of its own."""
    assert_model_dir_holds_the_masters(reference_run, "fp32")


@pytest.mark.slow
def test_bf16_kill_9_and_resume_reproduces_the_losses_bit_for_bit(tmp_path, shards):
    """bf16 on the CPU: the bf16 module copy and the fp32 masters both come back exactly. ZeRO-2 (NANO_RUN's
    stage), whose consolidated model is the fp32 master copy, not the bf16 one. Five steps of SMALL_BF16's
    128 tokens, killed after step 4 and resumed from step 3."""
    bf16 = (*SMALL_BF16, "train.max_steps=5")
    whole = trained(project_file(tmp_path, shards, *bf16, name="whole"))
    assert_model_dir_holds_the_masters(whole, "bf16")
    project = project_file(tmp_path, shards, *bf16, name="killed")
    assert train(project, fault="kill@4").returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == losses(whole)
    assert losses(whole)[-1] < losses(whole)[0] - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("stage,when", [
    (0, "before the optimizer step"),  # fp32 ZeRO-0: the loop clips, sees the norm first
    (2, "after the optimizer step, which DeepSpeed skipped")])
def test_an_infinite_gradient_norm_stops_the_run_with_exit_code_4(tmp_path, shards, stage, when):
    project = project_file(tmp_path, shards, f"deepspeed.zero_stage={stage}", "train.eval_every=0")
    result = train(project, fault="inf_grad@5")
    assert result.returncode == 4
    assert_user_error(result, "Training stopped at step 5", when, "the gradient norm is", "step_00000003")
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert len(losses(run)) == 4  # step 5's line is never written


# --- reliability: one run per dir, starting over, damaged checkpoints, retention, unreadable metrics ------------

SHORT = ("--set", "train.eval_every=0")


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_dir_is_refused_naming_the_first(tmp_path, shards):
    import signal
    import socket
    import subprocess
    import sys

    from conftest import HANG_SECONDS, gpt_env, train_env, wait_until

    project = project_file(tmp_path, shards)
    with open(tmp_path / "first.err", "w") as first_err:
        first = subprocess.Popen([sys.executable, "-m", "gptcli", "train", "--project", str(project), *SHORT,
                                  "--set", "train.max_steps=1000", "--set", "train.checkpoint_every=0"],
                                 env=gpt_env(train_env()), stdout=subprocess.DEVNULL, stderr=first_err)
        metrics = tmp_path / "run" / "metrics.jsonl"
        wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, first,
                   f"a first step (stderr in {tmp_path / 'first.err'})")
        second = train(project)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=HANG_SECONDS) == 143
    assert_user_error(second, "in use by another gpt train", f"pid {first.pid} on host {socket.gethostname()}")
    assert len(losses(tmp_path / "run")) >= 1  # one run's steps, in order: nothing of the second one
    assert not (tmp_path / "run" / ".gptcli-lock").exists()  # the first gave it back on its way out


@pytest.mark.slow
def test_resume_never_refuses_an_existing_run_and_restart_starts_it_over(tmp_path, shards, reference_run):
    project = copy_run(reference_run, tmp_path, shards)
    run = tmp_path / "run"
    (run / "NOTES.md").write_text("what this run is for")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused = train(project, "--resume", "never")
    assert_user_error(refused, "already holds a run", "--resume never does not delete it", "--restart")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    restarted = train(project, "--restart", *SHORT, "--set", "train.max_steps=2")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "--restart removed what gpt train wrote" in " ".join(restarted.stderr.split())
    assert (run / "NOTES.md").read_text() == "what this run is for"
    assert losses(run)[0] == losses(reference_run)[0]  # a fresh model again, not a resumed one
    assert len(losses(run)) == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path, shards, reference_run):
    project = copy_run(reference_run, tmp_path, shards)
    model_states = tmp_path / "run" / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    with open(model_states, "r+b") as handle:
        handle.truncate(1000)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_warning = " ".join(resumed.stderr.split())
    assert "checkpoint step_00000008 is damaged (mp_rank_00_model_states.pt has 1000 bytes" in assert_warning
    assert "resuming from step_00000006 instead" in assert_warning
    assert losses(tmp_path / "run") == losses(reference_run)


@pytest.mark.slow
def test_resume_without_an_intact_checkpoint_names_the_damaged_files(tmp_path, shards, reference_run):
    """`gpt train` (--resume auto, its default) end to end; --resume required asks the same rank-0 decision
    (checkpoint.decide_start), in this process."""
    from gptcli.errors import GptError
    from gptcli.train.state.checkpoint import decide_start

    project = copy_run(reference_run, tmp_path, shards)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (checkpoints / "step_00000006" / "rng_rank0.pt").unlink()
    with open(checkpoints / "step_00000003" / "mp_rank_00_model_states.pt", "r+b") as handle:
        handle.truncate(10)
    damaged = ("No usable checkpoint", "step_00000008: zero_pp_rank_0_mp_rank_00_optim_states.pt is missing",
               "step_00000006: rng_rank0.pt is missing", "step_00000003: mp_rank_00_model_states.pt has 10 bytes",
               "--restart")
    result = train(project)
    assert_user_error(result, *damaged)
    assert "internal error" not in result.stderr
    with pytest.raises(GptError) as required:
        decide_start(tmp_path / "run", "required", restart=False)
    assert all(fragment in str(required.value) for fragment in damaged), str(required.value)


@pytest.mark.slow
def test_keep_checkpoints_2_with_a_checkpoint_every_step(tmp_path, shards):
    from gptcli.train.state.checkpoint import check_checkpoint

    result = train(project_file(tmp_path, shards), *SHORT, "--set", "train.max_steps=5",
                   "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004", "step_00000005"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000005"
    assert all(check_checkpoint(p) == [] and (p / "manifest.json").is_file() for p in checkpoints.glob("step_*"))


@pytest.mark.slow
def test_metrics_with_bytes_that_are_not_utf8_do_not_block_resume(tmp_path, shards, reference_run):
    project = copy_run(reference_run, tmp_path, shards)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:2]) + b"\xff\xfe\x9c garbage\n" + b"".join(lines[2:]))
    resumed = train(project, "--resume", "required", *SHORT, "--set", "train.max_steps=10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dropped 1 unreadable line" in resumed.stderr
    assert losses(tmp_path / "run")[:8] == losses(reference_run) and len(losses(tmp_path / "run")) == 10


@pytest.mark.slow
def test_an_out_dir_that_is_a_file_or_not_writable_is_one_sentence(tmp_path, shards):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a run dir")
    project = project_file(tmp_path, shards)
    result = train(project, "--set", f'project.out_dir="{a_file}"')
    assert_user_error(result, f"project.out_dir {a_file} is a file, not a directory")
    result = train(project, "--set", f'project.out_dir="{a_file / "run"}"')  # where nothing can be created
    assert_user_error(result, f"Cannot create the run dir {a_file / 'run'}", "choose a writable project.out_dir")
    assert "internal error" not in result.stderr and a_file.read_text() == "not a run dir"


@pytest.mark.slow
def test_ranks_that_do_not_share_the_run_dir_are_refused_on_every_rank(tmp_path, shards):
    """Two nodes with local disks, as torchrun or srun would start them: same project, each rank its own
    out_dir. Rank 0's probe file is not seen by rank 1, so both stop before writing anything."""
    import subprocess
    import sys

    from conftest import gpt_env

    project, port = project_file(tmp_path, shards), str(worker_port())
    ranks = []
    for rank in (0, 1):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "gptcli", "train", "--project", str(project),
                                       "--set", f'project.out_dir="{tmp_path / f"node{rank}"}"'],
                                      env=gpt_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in ranks:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 1, stderr[-3000:]
        message = " ".join(stderr.split())
        assert "is not shared by all ranks: rank 1 on host" in message and "every node mounts" in message, message
        assert "Traceback" not in stderr
    assert list((tmp_path / "node0").iterdir()) == []  # no lock, no probe, no metrics left behind
    assert not (tmp_path / "node1").exists()  # only rank 0 creates the run dir
