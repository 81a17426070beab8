"""How [train]/[deepspeed] become a DeepSpeed config, batch layout and optimizer groups; the examples."""

from pathlib import Path

import pytest

from gptcli.batch import batch_layout
from gptcli.config import load_project, project_from_dict
from gptcli.errors import GptError
from gptcli.model import build_model
from gptcli.optimizers import ADAMW
from gptcli.train.engine import deepspeed_config, parameter_groups

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def project(**sections):
    return project_from_dict(sections)


def test_global_batch_tokens_derives_the_accumulation():
    p = project(model={"preset": "gpt2"}, train={"micro_batch_size": 16, "seq_len": 1024, "global_batch_tokens": 524288})
    layout = batch_layout(p.train, p.seq_len, 8)
    assert layout.grad_accum_steps == 4 and layout.tokens_per_step == 524288
    with pytest.raises(GptError, match="not a multiple"):
        batch_layout(p.train, p.seq_len, 3)


def test_seq_len_defaults_to_the_context_and_may_not_exceed_it():
    nano = project(model={"preset": "nano"})
    assert batch_layout(nano.train, nano.seq_len, 1).seq_len == 64
    with pytest.raises(GptError, match="block_size"):
        project(model={"preset": "nano"}, train={"seq_len": 65})


def test_deepspeed_config_from_the_sections_with_the_passthrough_merged_last():
    p = project(train={"micro_batch_size": 4, "grad_accum_steps": 3, "grad_clip": 0.5},
                deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                           "config": {"zero_optimization": {"overlap_comm": True}, "bf16": {"enabled": False}}})
    config = deepspeed_config(p, batch_layout(p.train, p.seq_len, 2), "bf16")
    assert config["train_batch_size"] == 4 * 3 * 2 and config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["bf16"] == {"enabled": False}  # the passthrough wins
    fp16 = deepspeed_config(p, batch_layout(p.train, p.seq_len, 1), "fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling: overflow steps are skipped


def test_weight_decay_goes_to_matrices_only():
    model = build_model(project(model={"preset": "nano"}).model, device="meta")
    decay, no_decay = parameter_groups(model, ADAMW, project().train)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert "wte.weight" in decayed and "h.0.attn.c_attn.weight" in decayed and "h.1.mlp.c_proj.weight" in decayed
    assert not any(n.endswith(".bias") or "ln_" in n or n.startswith("wpe") for n in decayed)
    assert "wpe.weight" in {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once


@pytest.mark.parametrize("name,preset,world,accum", [
    ("cpu-demo.toml", "nano", 1, 1), ("gpt1-bookscorpus.toml", "openai-gpt", 1, 1),
    ("gpt2-124m-8gpu.toml", "gpt2", 8, 4), ("distilgpt2-1gpu.toml", "distilgpt2", 1, 8)])
def test_the_examples_load_and_give_their_batches(name, preset, world, accum):
    p = load_project(EXAMPLES / name)
    assert p.model.preset == preset and batch_layout(p.train, p.seq_len, world).grad_accum_steps == accum
