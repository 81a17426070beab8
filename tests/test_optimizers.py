"""Optimizer specs (optimizers.py): AdamW's grouping by name, the options a spec declares, the refusals a
resume makes, and (slow) a plugin optimizer trained by gptcli: its first update is its rule applied to the
run's own gradients, and a kill -9 and resume repeats the run bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from conftest import REPO, losses, project_file, train
from gptcli.config import ConfigError, project_from_dict
from gptcli.errors import GptError
from gptcli.model import build_model
from gptcli.optimizers import ADAMW, OptimizerSpec, ParameterGroup, grouped_names, optimizer_spec

PLUGINS = REPO / "examples" / "plugins" / "gptcli_example_plugins"


def named_shapes(**model) -> list[tuple[str, tuple[int, ...]]]:
    config = project_from_dict({"model": {"preset": "nano", "n_layer": 1, **model}}).model
    return [(name, tuple(p.shape)) for name, p in build_model(config, device="meta").named_parameters()]


BLOCK_MATRICES = ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]
BLOCK_OTHERS = ["h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.bias", "h.0.attn.c_proj.bias", "h.0.ln_2.weight",
                "h.0.ln_2.bias", "h.0.mlp.c_fc.bias", "h.0.mlp.c_proj.bias"]


@pytest.mark.parametrize("model, decayed, others", [
    ({}, ["wte.weight", *BLOCK_MATRICES], ["wpe.weight", *BLOCK_OTHERS, "ln_f.weight", "ln_f.bias"]),
    ({"norm_position": "post", "final_norm": False}, ["wte.weight", *BLOCK_MATRICES], ["wpe.weight", *BLOCK_OTHERS]),
    ({"position": "rotary"}, ["wte.weight", *BLOCK_MATRICES], [*BLOCK_OTHERS, "ln_f.weight", "ln_f.bias"]),
    ({"tie_embeddings": False}, ["wte.weight", *BLOCK_MATRICES, "lm_head.weight"],
     ["wpe.weight", *BLOCK_OTHERS, "ln_f.weight", "ln_f.bias"]),
], ids=["gpt-2", "gpt-1", "rotary", "untied head"])
def test_adamw_decays_the_weight_matrices_only(model, decayed, others):
    """Decay on wte (the tied head) and the blocks' matrices, in the model's order, first; none on wpe, biases
    and LayerNorms: the groups every AdamW checkpoint was saved with."""
    train = project_from_dict({"train": {"weight_decay": 0.25}}).train
    groups = grouped_names(ADAMW, named_shapes(**model), train)
    order = [name for name, _ in named_shapes(**model)]
    assert [list(group.names) for group in groups] == [sorted(decayed, key=order.index), sorted(others, key=order.index)]
    assert [dict(group.options) for group in groups] == [{"weight_decay": 0.25}, {"weight_decay": 0.0}]


def test_adamw_is_the_default_and_says_what_it_keeps():
    assert optimizer_spec(project_from_dict({}).train.optimizer) is ADAMW
    assert (ADAMW.state_bytes, ADAMW.state_keys, ADAMW.step_key) == (8, ("exp_avg", "exp_avg_sq"), "step")


def test_a_grouping_that_loses_or_repeats_a_parameter_is_one_sentence():
    train = project_from_dict({}).train
    loses = OptimizerSpec("lossy", "drops biases", 4, lambda parameters, train: [
        ParameterGroup(tuple(name for name, shape in parameters if len(shape) == 2))], build=None)
    with pytest.raises(GptError, match=r'"lossy" groups the parameters wrongly: h.0.ln_1.weight in no group, '
                                       r"h.0.ln_1.bias in no group, .* and 4 more\.$"):
        grouped_names(loses, named_shapes(), train)
    twice = OptimizerSpec("twice", "every parameter twice", 4, lambda parameters, train: [
        ParameterGroup(tuple(name for name, _ in parameters))] * 2, build=None)
    with pytest.raises(GptError, match=r"wte.weight in several groups"):
        grouped_names(twice, named_shapes(), train)


def test_options_are_the_specs_own_and_checked_when_the_project_loads(tmp_path):
    shutil.copy(PLUGINS / "optimizer.py", tmp_path)
    run = tmp_path / "run.toml"

    def load(options: str):
        run.write_text(f'[train]\noptimizer = "optimizer.py:OPTIMIZER"\noptimizer_options = {options}\n')
        from gptcli.config import load_project

        return load_project(run)

    project = load("{ nesterov = true }")
    assert project.train.optimizer == f"{tmp_path / 'optimizer.py'}:OPTIMIZER"  # read beside the project file
    assert optimizer_spec(project.train.optimizer).option_values(project.train) == {"momentum": 0.9, "nesterov": True}
    with pytest.raises(ConfigError, match=r'optimizer_options.momentun is not an option of the optimizer '
                                          r'"example_optimizer" \(its options: momentum, nesterov; .*"momentum"\?\)'):
        load("{ momentun = 0.5 }")
    with pytest.raises(ConfigError, match=r"momentum must be at least 0 and less than 1, not 1.5"):
        load("{ momentum = 1.5 }")
    with pytest.raises(ConfigError, match=r"nesterov must be true or false, not 'yes'"):
        load('{ nesterov = "yes" }')
    with pytest.raises(ConfigError, match=r'not an option of the optimizer "adamw" \(its options: none; it also '
                                          r"reads \[train\] lr, beta1, beta2, eps, weight_decay\)"):
        project_from_dict({"train": {"optimizer_options": {"momentum": 0.9}}})


def test_the_schedule_sets_every_group_and_a_group_may_scale_it():
    from gptcli.train.loop import set_learning_rate

    weights = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": weights[:1]}, {"params": weights[1:], "lr_scale": 0.5}], lr=1.0)
    set_learning_rate(optimizer, 0.1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.05]


def test_an_unknown_optimizer_or_an_object_that_is_no_spec_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r'train.optimizer names "adma", which is not an optimizer \(built in: '
                                          r'adamw.*\(did you mean "adamw"\?\)'):
        project_from_dict({"train": {"optimizer": "adma"}})
    with pytest.raises(GptError, match=r'train.optimizer = "json:dumps" names function .* not an OptimizerSpec'):
        optimizer_spec("json:dumps")


def test_a_resume_with_another_optimizer_or_of_unmovable_state_on_other_ranks_is_one_sentence():
    from gptcli.train.loop import check_optimizer
    from gptcli.train.state.reshard import check_reshardable

    sgd = OptimizerSpec("example_optimizer", "", 4, ADAMW.group, ADAMW.build, state_keys=("momentum_buffer",))
    check_optimizer({"optimizer": "example_optimizer"}, sgd, "step_00000002", "runs/a")
    check_optimizer({}, ADAMW, "step_00000002", "runs/a")  # checkpoints before the record are AdamW's
    with pytest.raises(GptError, match=r'Cannot resume checkpoint step_00000002 with train.optimizer "adamw": its '
                                       r'optimizer state is "example_optimizer"\'s; resume with train.optimizer = '
                                       r'"example_optimizer", or start a new run .*train.init_from = "runs/a"'):
        check_optimizer({"optimizer": "example_optimizer"}, ADAMW, "step_00000002", "runs/a")
    check_reshardable(ADAMW, "step_00000002", 2, 1)
    with pytest.raises(GptError, match=r"Cannot resume checkpoint step_00000002 on 1 rank\(s\): it was saved on 2, .*"
                                       r'not the "example_optimizer" optimizer\'s momentum_buffer; resume it on 2'):
        check_reshardable(sgd, "step_00000002", 2, 1)


# --- a plugin optimizer in a training run (slow) ----------------------------------------------------------------

# The example optimizer (SGD with momentum) and attention pattern (strided) on nano: no dropout and no
# clipping, so the first step is the rule applied to the plain gradients; a checkpoint every step. AdamW's
# own keys are set, as in a project that switched optimizers, so that gpt train notes it does not read them.
PLUGIN_RUN = ("model.dropout=0.0", "model.sliding_window=16", "train.max_steps=4", "train.checkpoint_every=1",
              "train.eval_every=0", "train.grad_clip=0.0", "train.warmup_steps=0", "train.lr=0.05",
              "train.beta1=0.9", "train.beta2=0.95", "train.eps=1e-8")


def plugin_project(directory: Path, data: Path, optimizer: str, attention: str) -> Path:
    return project_file(directory, data, *PLUGIN_RUN, f'train.optimizer="{optimizer}"', f'model.attention="{attention}"')


def first_step_gradients(project: Path, data: Path, probe: Path, initial: dict) -> dict[str, torch.Tensor]:
    """The gradients of step 1, computed here from the initial weights and the windows the run's loader
    handed out (the probe's list): the mean over the micro batches, as DeepSpeed accumulates them."""
    from gptcli.config import load_project
    from gptcli.data.loader import BatchLoader
    from gptcli.data.shards import open_prepared
    from gptcli.model import model_from_state_dict

    loaded = load_project(project)
    model = model_from_state_dict(loaded.model, {name: state["fp32"] for name, state in initial.items()
                                                 if name != "step"})
    accumulation = loaded.train.grad_accum_steps
    loader = BatchLoader(open_prepared(data), "train", loaded.train.micro_batch_size, loaded.seq_len)
    lines = (probe / "windows-rank0.jsonl").read_text().splitlines()[:accumulation]
    for line in lines:
        windows = torch.from_numpy(np.stack([loader.window(i) for i in json.loads(line)["windows"]]).astype(np.int64))
        _, loss = model(windows[:, :-1], windows[:, 1:], return_logits=False)  # (B, T+1) → inputs, targets
        (loss / accumulation).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.slow
def test_a_plugin_optimizer_trains_its_rule_and_resumes_bit_for_bit(tmp_path, shards, installed_plugins):
    """By its entry-point names (the installed example package), with probes: the loss falls, step 1's
    momentum buffer is the gradient computed here and its weights are w·(1 − lr·decay) − lr·g (fp32; 1e-7,
    the rounding of the two products). By "file.py:attr" beside the project file: killed after step 2 and
    resumed, the losses are the first run's bit for bit (the momentum buffers came back with the checkpoint)."""
    data = shards
    named, probe = tmp_path / "named", tmp_path / "probe"
    named.mkdir()
    project = plugin_project(named, data, "example_optimizer", "example_attention")
    result = train(project, probe=probe, env=installed_plugins)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: train.optimizer example_optimizer does not read train.beta1, train.beta2, train.eps" in result.stderr
    reference = losses(named / "run")
    assert reference[-1] < reference[0] - 1.0
    assert json.loads((named / "run/checkpoints/step_00000004/client_state.json").read_text())["optimizer"] == \
        "example_optimizer"

    initial = torch.load(probe / "state-initialized-step00000000.pt")
    after = torch.load(probe / "state-saved-step00000001.pt")
    gradients = first_step_gradients(project, data, probe, initial)
    lr = json.loads((named / "run/metrics.jsonl").read_text().splitlines()[0])["lr"]
    for name, gradient in gradients.items():
        decay = 0.1 if gradient.dim() >= 2 and not name.startswith(("wte.", "wpe.")) else 0.0
        torch.testing.assert_close(after[name]["momentum_buffer"], gradient, rtol=0, atol=1e-7)
        expected = initial[name]["fp32"] * (1 - lr * decay) - lr * gradient
        torch.testing.assert_close(after[name]["fp32"], expected, rtol=0, atol=1e-7)

    files = tmp_path / "files"
    files.mkdir()
    for name in ("optimizer.py", "attention.py"):
        shutil.copy(PLUGINS / name, files)
    project = plugin_project(files, data, "example_optimizer", "example_attention")
    project.write_text(project.read_text().replace('"example_optimizer"', '"optimizer.py:OPTIMIZER"')
                       .replace('"example_attention"', '"attention.py:PATTERN"'))  # beside it, not in the cwd
    assert tomllib.loads(project.read_text())["model"]["attention"] == "attention.py:PATTERN"
    killed = train(project, fault="kill@2")
    assert killed.returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(files / "run") == reference
