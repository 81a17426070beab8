"""What a run continues from, decided before anything slow (train/continuation.py, train/warmstart.py):
[model] from init_from's config or a checkpoint's, contradictions and a tokenizer mismatch as one sentence,
the batch kept on another number of ranks, and the lines the plan prints. No DeepSpeed here: the runs
themselves are in test_train_continue.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from conftest import assert_user_error, run_gpt
from gptcli.config import apply_overrides, dump_toml, project_from_dict
from gptcli.errors import GptError
from gptcli.train.state import checkpoint
from gptcli.train.state.continuation import describe, prepare, resolve_model
from gptcli.train.state.warmstart import find_source, fit_vocabulary_rows, weights_sha256
from shard_fixture import write_shard_dir

BASE = """\
[project]
out_dir = "{out}"
[data]
dir = "{data}"
[train]
micro_batch_size = 2
grad_accum_steps = 2
seq_len = 32
device = "cpu"
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model dir of the nano shape with GPT-2's tokenizer (test_train_continue.py starts from load-hf's)."""
    from gptcli.model import build_model
    from gptcli.modeldir import save_model_dir
    from gptcli.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = build_model(project_from_dict({"model": {"preset": "nano"}}).model)
    return save_model_dir(tmp_path_factory.mktemp("source") / "model", model, load_tokenizer("gpt2"))


@pytest.fixture(scope="module")
def gpt2_shards(tmp_path_factory):
    from gptcli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    directory = tmp_path_factory.mktemp("shards")
    ids = np.random.default_rng(0).integers(0, 50257, 4000)
    write_shard_dir(directory, [("train", ids[:3000]), ("val", ids[3000:])], vocab_size=50257,
                    fingerprint=tokenizer.fingerprint, name="gpt2")
    return directory


def project_of(tmp_path: Path, shards: Path, *overrides: str):
    raw = tomllib.loads(BASE.format(out=tmp_path / "run", data=shards))
    return project_from_dict(apply_overrides(raw, list(overrides)))


# --- [model] from the source -----------------------------------------------------------------------------------


def test_model_keys_come_from_the_source_and_the_project_keeps_the_ones_it_sets(tmp_path, model_dir, gpt2_shards):
    project = project_of(tmp_path, gpt2_shards, f'train.init_from="{model_dir}"', "model.dropout=0.25",
                         "model.vocab_multiple=128")
    start = prepare(project, "auto", 1)
    model = start.project.model
    assert (model.n_layer, model.n_embd, model.block_size, model.vocab_size) == (2, 64, 64, 50257)
    assert model.dropout == 0.25 and model.vocab_multiple == 128  # not the architecture: the project's
    assert start.weights is not None and start.tag is None
    assert start.project.train.init_from == str(model_dir.absolute())
    assert start.project.train.init_from_sha256 == weights_sha256([model_dir / "model.safetensors"])
    assert start.config_hash == checkpoint.config_hash(project)  # of the project as written, not as resolved


@pytest.mark.parametrize("override,key,mine,theirs", [
    ("model.n_layer=3", "model.n_layer", "3", "2"),
    ('model.preset="gpt2"', "model.block_size", "1024", "64"),  # a preset's keys count as set
    ('model.activation="relu"', "model.activation", "'relu'", "'gelu_new'")])
def test_a_project_key_that_contradicts_the_architecture_names_it_and_both_values(tmp_path, model_dir, gpt2_shards,
                                                                                  override, key, mine, theirs):
    project = project_of(tmp_path, gpt2_shards, f'train.init_from="{model_dir}"', override)
    with pytest.raises(GptError) as error:
        prepare(project, "auto", 1)
    message = str(error.value)
    assert f"{key} is {mine} in the project but {theirs} in train.init_from" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_resolve_model_leaves_agreeing_keys_alone(tmp_path, model_dir, gpt2_shards):
    source = find_source(str(model_dir)).config
    project = project_of(tmp_path, gpt2_shards, "model.n_layer=2", "model.n_head=2", "model.init_std=0.5")
    resolved = resolve_model(project, source, "the source")
    assert resolved.n_layer == 2 and resolved.init_std == 0.5 and resolved.n_embd == 64


def test_shards_of_another_tokenizer_are_one_sentence(tmp_path, model_dir):
    other = tmp_path / "other-shards"
    write_shard_dir(other, [("train", np.arange(3000) % 1000)], vocab_size=50257, fingerprint="test:0123456789abcdef",
                    name="test")
    with pytest.raises(GptError, match=r'train.init_from ".*" was trained with the gpt2 tokenizer \(gpt2:[0-9a-f]+\), '
                                       r"but the shards in .* were made with test:0123456789abcdef; prepare the data "
                                       r"with the model's tokenizer\."):
        prepare(project_of(tmp_path, other, f'train.init_from="{model_dir}"'), "auto", 1)


def test_a_recorded_sha256_that_differs_is_refused(tmp_path, model_dir, gpt2_shards):
    project = project_of(tmp_path, gpt2_shards, f'train.init_from="{model_dir}"', f'train.init_from_sha256="{"0" * 64}"')
    with pytest.raises(GptError, match="the weights changed since it was recorded"):
        prepare(project, "auto", 1)


def test_a_run_dir_resolves_to_its_model_and_other_paths_are_named(tmp_path, model_dir):
    import shutil

    shutil.copytree(model_dir, tmp_path / "run" / "model")
    assert find_source(str(tmp_path / "run")).location == str((tmp_path / "run" / "model").absolute())
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(GptError, match="has no consolidated model yet"):
        find_source(str(tmp_path / "empty-run"))
    with pytest.raises(GptError, match=r'train.init_from "no-such-model" is neither a path that exists nor a model '
                                       r"gpt load-hf fetches \(openai-gpt, gpt2, gpt2-medium"):
        find_source("no-such-model")


def test_a_hub_name_that_cannot_be_had_is_one_sentence_naming_load_hf(monkeypatch):
    from gptcli.hf import source

    def offline(name):
        raise GptError(f"Could not download {name}: cannot reach the Hugging Face Hub, and it is not in the cache.")

    monkeypatch.setattr(source, "resolve_source", offline)
    with pytest.raises(GptError) as error:
        find_source("gpt2-medium")
    assert str(error.value) == (
        'train.init_from "gpt2-medium": its weights are not in the local Hugging Face cache and could not be '
        "downloaded; where there is network run `gpt load-hf gpt2-medium --out models/gpt2-medium`, then set "
        'train.init_from = "models/gpt2-medium".')


@pytest.mark.slow
def test_gpt_train_offline_with_a_hub_name_not_cached_says_so_in_one_sentence(tmp_path, gpt2_shards):
    project = tmp_path / "run.toml"
    project.write_text(BASE.format(out=tmp_path / "run", data=gpt2_shards) + 'init_from = "distilgpt2"\n')
    result = run_gpt("train", "--project", project, cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
    assert_user_error(result, 'train.init_from "distilgpt2": its weights are not in the local Hugging Face cache and '
                      "could not be downloaded", "`gpt load-hf distilgpt2 --out models/distilgpt2`",
                      'train.init_from = "models/distilgpt2"')
    assert len(result.stderr.strip().splitlines()) <= 2 and not (tmp_path / "run").exists()


def test_fit_vocabulary_rows_pads_with_zero_rows_and_cuts_to_the_real_ones():
    from gptcli.config import ModelConfig

    wte = torch.randn(10, 4)
    padded = fit_vocabulary_rows({"wte.weight": wte}, ModelConfig(vocab_size=10, vocab_multiple=8, n_embd=4, n_head=1))
    assert padded["wte.weight"].shape == (16, 4) and torch.equal(padded["wte.weight"][:10], wte)
    assert not padded["wte.weight"][10:].any()
    cut = fit_vocabulary_rows(padded, ModelConfig(vocab_size=10, n_embd=4, n_head=1))
    assert torch.equal(cut["wte.weight"], wte)


# --- resuming: the batch and the model of the checkpoint ----------------------------------------------------------


def fake_checkpoint(run_dir: Path, step: int, world_size: int, windows_per_step: int, **client) -> str:
    """A checkpoint dir holding only what prepare() reads: its client state, its manifest, `latest`."""
    tag = checkpoint.tag_for(step)
    directory = checkpoint.checkpoints_dir(run_dir) / tag
    directory.mkdir(parents=True)
    state = {"step": step, "tokens": step * windows_per_step * 32, "world_size": world_size,
             "loader": {"epoch": 0, "position": step * windows_per_step, "windows_per_step": windows_per_step},
             "batch_settings": {"micro_batch_size": 2, "grad_accum_steps": 2, "global_batch_tokens": 0,
                                "seq_len": 32}, **client}
    (directory / checkpoint.CLIENT_STATE).write_text(json.dumps(state))
    checkpoint.write_manifest(directory)
    (checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST).write_text(tag + "\n")
    return tag


def test_resuming_on_other_ranks_keeps_the_sequences_per_step(tmp_path, gpt2_shards):
    fake_checkpoint(tmp_path / "run", 6, world_size=1, windows_per_step=4)  # 2 per micro × 2 accumulated × 1 rank
    start = prepare(project_of(tmp_path, gpt2_shards), "auto", 2)
    assert (start.tag, start.step, start.saved_ranks, start.ranks) == ("step_00000006", 6, 1, 2)
    assert start.project.train.global_batch_tokens == 4 * 32  # accumulation 1 on 2 ranks
    assert start.notes == ["gradient accumulation 2 → 1 keeps its 4 sequences per step"]
    line = " ".join(describe(start))
    assert "from checkpoint step_00000006 (step 6), saved on 1 rank, resuming on 2" in line
    assert "ZeRO-1 partitions are re-split through DeepSpeed's universal checkpoint format" in line
    same = prepare(project_of(tmp_path, gpt2_shards), "auto", 1)
    assert same.project.train.global_batch_tokens == 0 and same.notes == []
    assert describe(same) == ["  from checkpoint step_00000006 (step 6), saved on 1 rank, resuming on 1"]


def test_a_batch_no_accumulation_can_keep_is_one_sentence_before_anything_is_loaded(tmp_path, gpt2_shards):
    fake_checkpoint(tmp_path / "run", 6, world_size=1, windows_per_step=4)
    with pytest.raises(GptError) as error:
        prepare(project_of(tmp_path, gpt2_shards), "auto", 3)
    assert str(error.value) == (
        "Checkpoint step_00000006 was trained with 4 sequences per step (2 per micro batch × 2 accumulated × 1 ranks), "
        "which 3 ranks cannot keep with micro batches of 2: resume on a number of ranks that divides 2, or set "
        "train.global_batch_tokens (or train.micro_batch_size) to choose another batch.")


def test_batch_settings_changed_since_the_checkpoint_decide_the_batch(tmp_path, gpt2_shards):
    fake_checkpoint(tmp_path / "run", 6, world_size=1, windows_per_step=4)
    start = prepare(project_of(tmp_path, gpt2_shards, "train.grad_accum_steps=4"), "auto", 2)
    assert start.project.train.global_batch_tokens == 0 and start.ranks_changed  # 2 × 4 × 2 from here on


def test_a_run_started_from_weights_resumes_with_its_checkpoints_model_not_the_source(tmp_path, gpt2_shards):
    saved_model = {**project_from_dict({"model": {"preset": "nano"}}).model.__dict__, "dropout": 0.3}
    record = {"source": "gone", "location": "/nowhere/gone", "path": "/nowhere/gone/model.safetensors",
              "sha256": "ab" * 32}
    fake_checkpoint(tmp_path / "run", 4, world_size=1, windows_per_step=4, model=saved_model, init_from=record)
    start = prepare(project_of(tmp_path, gpt2_shards, 'train.init_from="/nowhere/gone"'), "auto", 1)
    assert start.weights is None and start.tag == "step_00000004"  # the source is never looked for
    assert start.project.model.n_layer == 2 and start.project.model.dropout == 0.3
    assert start.project.train.init_from_sha256 == "ab" * 32
    assert "the run started from weights gone" in describe(start)[0]
    with pytest.raises(GptError, match="model.n_layer is 4 in the project but 2 in checkpoint step_00000004"):
        prepare(project_of(tmp_path, gpt2_shards, 'train.init_from="/nowhere/gone"', "model.n_layer=4"), "auto", 1)


def test_the_plan_says_which_weights_with_their_sha256(tmp_path, model_dir, gpt2_shards):
    start = prepare(project_of(tmp_path, gpt2_shards, f'train.init_from="{model_dir}"'), "never", 1)
    digest = weights_sha256([model_dir / "model.safetensors"])
    assert describe(start) == [f"  from weights: train.init_from {model_dir} = {model_dir.absolute() / 'model.safetensors'} "
                               f"(sha256 {digest}); step 0, a fresh optimizer and schedule"]


def test_resolved_config_round_trips_with_the_recorded_source(tmp_path, model_dir, gpt2_shards):
    """config.resolved.toml is a project file: loaded again it names the same model dir and sha256."""
    start = prepare(project_of(tmp_path, gpt2_shards, f'train.init_from="{model_dir}"'), "never", 1)
    again = project_from_dict(tomllib.loads(dump_toml(start.project)))
    assert again.train.init_from == str(model_dir.absolute())
    assert prepare(again, "never", 1).weights.sha256 == start.project.train.init_from_sha256
