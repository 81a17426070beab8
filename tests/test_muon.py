"""Muon beside AdamW (optimizers.MUON): the split of the parameters by name, the options, the planner's count of
its state, the settings it refuses, and (slow) its update against Newton–Schulz computed here, in the optimizer
gptcli builds and in `gpt train` at ZeRO-0 and ZeRO-2, an exact resume after kill -9, and two ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NANO_RUN, losses, project_file, train, trained
from gptcli import planner
from gptcli.config import ConfigError, project_from_dict
from gptcli.errors import GptError
from gptcli.model import build_model
from gptcli.optimizers import MUON, grouped_names, optimizer_spec


def named_shapes(**model) -> list[tuple[str, tuple[int, ...]]]:
    config = project_from_dict({"model": {"preset": "nano", **model}}).model
    return [(name, tuple(p.shape)) for name, p in build_model(config, device="meta").named_parameters()]


def block(layer: int, names: list[str]) -> list[str]:
    return [f"h.{layer}.{name}" for name in names]


# A block's matrices largest first, as DeepSpeed's MuonWithAuxAdam orders them: mlp.c_fc (4C, C), attn.c_attn
# (3C, C), mlp.c_proj (C, 4C), attn.c_proj (C, C); block 0's before block 1's where the shapes are equal.
MATRICES = ["mlp.c_fc.weight", "attn.c_attn.weight", "mlp.c_proj.weight", "attn.c_proj.weight"]
NORMS_AND_BIASES = ["ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                    "mlp.c_fc.bias", "mlp.c_proj.bias"]


@pytest.mark.parametrize("model, adamw, plain", [
    ({}, ["wte.weight"], ["wpe.weight", *block(0, NORMS_AND_BIASES), *block(1, NORMS_AND_BIASES), "ln_f.weight",
                          "ln_f.bias"]),
    ({"norm_position": "post", "final_norm": False}, ["wte.weight"],
     ["wpe.weight", *block(0, NORMS_AND_BIASES), *block(1, NORMS_AND_BIASES)]),
    ({"position": "rotary"}, ["wte.weight"],
     [*block(0, NORMS_AND_BIASES), *block(1, NORMS_AND_BIASES), "ln_f.weight", "ln_f.bias"]),
    ({"tie_embeddings": False}, ["wte.weight", "lm_head.weight"],
     ["wpe.weight", *block(0, NORMS_AND_BIASES), *block(1, NORMS_AND_BIASES), "ln_f.weight", "ln_f.bias"]),
], ids=["gpt-2", "gpt-1", "rotary", "untied head"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_embeddings_head_norms_and_biases(model, adamw, plain):
    """By name: the blocks' four matrices to Muon, largest first; wte (the tied head), an untied lm_head and
    wpe never, whatever their shape; AdamW's decay on wte and lm_head only, as "adamw" decays them."""
    train = project_from_dict({"train": {"optimizer": "muon", "lr": 0.004, "weight_decay": 0.25}}).train
    groups = grouped_names(MUON, named_shapes(**model), train)
    matrices = [f"h.{layer}.{name}" for name in MATRICES for layer in (0, 1)]
    assert [list(group.names) for group in groups] == [matrices, adamw, plain]
    assert [group.label for group in groups] == ["Muon", "AdamW", "AdamW, no decay"]
    assert dict(groups[0].options) == {"use_muon": True, "lr_scale": pytest.approx(0.02 / 0.004), "momentum": 0.95,
                                       "weight_decay": 0.01, "ns_method": "gram"}
    assert [dict(group.options) for group in groups[1:]] == [{"use_muon": False, "weight_decay": 0.25},
                                                             {"use_muon": False, "weight_decay": 0.0}]


def test_muon_is_built_in_and_its_options_are_checked_when_the_project_loads():
    assert optimizer_spec("muon") is MUON
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0, "ns_method": "standard"}
    train = project_from_dict({"train": {"optimizer": "muon", "optimizer_options": options}}).train
    assert MUON.option_values(train) == {**options, "weight_decay": 0.0}
    with pytest.raises(ConfigError, match=r"train.optimizer_options.ns_method must be one of 'gram', 'standard', "
                                          r"not 'cubic'\.$"):
        project_from_dict({"train": {"optimizer": "muon", "optimizer_options": {"ns_method": "cubic"}}})
    with pytest.raises(ConfigError, match=r"momentum must be at least 0 and less than 1, not 1.0"):
        project_from_dict({"train": {"optimizer": "muon", "optimizer_options": {"momentum": 1.0}}})
    with pytest.raises(ConfigError, match=r'ns_steps is not an option of the optimizer "muon" \(its options: lr, '
                                          r"momentum, weight_decay, ns_method;"):
        project_from_dict({"train": {"optimizer": "muon", "optimizer_options": {"ns_steps": 7}}})


# --- the plan ---------------------------------------------------------------------------------------------------


def test_the_planners_shapes_are_the_models():
    """The shapes the planner groups by (counts.parameter_shapes) are the built model's, in its order."""
    for model in ({"preset": "gpt2"}, {"preset": "openai-gpt"}, {"preset": "nano", "position": "rotary", "bias": False},
                  {"preset": "nano", "tie_embeddings": False, "mlp_ratio": 3}):
        config = project_from_dict({"model": model}).model
        built = [(name, tuple(p.shape)) for name, p in build_model(config, device="meta").named_parameters()]
        assert list(planner.counts.parameter_shapes(config).items()) == built


def gpt2_training(stage: int, precision: str = "bf16", ranks: int = 8, **train) -> planner.Training:
    project = project_from_dict({"model": {"preset": "gpt2"}, "train": {"optimizer": "muon", **train},
                                 "deepspeed": {"zero_stage": stage}})
    return planner.training_for(project, "cuda", ranks, precision)


def test_the_plan_counts_one_momentum_buffer_on_muons_share_and_newton_schulz_on_the_largest_matrix():
    """GPT-2 124M: 84,934,656 parameters in the blocks' matrices (12 × 7,077,888) keep 4 bytes (Muon's
    momentum), the rest AdamW's 8 (wte, padded to 50,304 rows on a GPU, wpe, norms and biases); fp32 ZeRO-0
    keeps no masters. Newton–Schulz's 4 fp32 buffers of the largest matrix (3072 × 768) join the step; ZeRO-2
    also keeps the momentum of whole matrices twice (DeepSpeed's staging copy)."""
    fp32 = gpt2_training(0, "fp32", ranks=1)
    muon = 12 * 7_077_888
    rest = planner.held_parameters(fp32) - muon
    layout = planner.state_layout(fp32)
    assert layout.resident["optimizer states"] == 4 * muon + 8 * rest
    assert layout.step["temporaries"] == 16 * 3072 * 768  # on a GPU fp32 AdamW's step makes none
    sharded = planner.state_layout(gpt2_training(3))
    assert sharded.resident["optimizer states"] == pytest.approx((4 + (4 * muon + 8 * rest) / (muon + rest))
                                                                 * planner.partition(gpt2_training(3)), abs=1)
    zero2 = gpt2_training(2)
    assert planner.state_layout(zero2).resident["optimizer states"] > planner.state_layout(gpt2_training(1)).resident[
        "optimizer states"]
    assert planner.state_layout(zero2).reduction["temporaries"] == 16 * 3072 * 768


def test_the_plan_prints_the_split_by_name_and_count():
    line = planner.optimizer_split(gpt2_training(1))
    assert line == ("optimizer: Muon on h.*.mlp.c_fc.weight, h.*.attn.c_attn.weight, h.*.mlp.c_proj.weight, "
                    "h.*.attn.c_proj.weight (48 tensors, 84.9M); AdamW on wte.weight (= the tied lm_head) "
                    "(1 tensor, 38.6M); AdamW, no decay on wpe.weight, h.*.ln_*.weight, h.*.*.bias, ln_f.weight, "
                    "ln_f.bias (99 tensors, 907.8K)")
    adamw = planner.training_for(project_from_dict({"model": {"preset": "gpt2"}}), "cuda", 8, "bf16")
    assert planner.optimizer_split(adamw) is None


# --- where it trains ----------------------------------------------------------------------------------------


def refusal(stage: int, precision: str, device: str = "cuda", **train) -> str | None:
    from gptcli.train.preflight import check_optimizer

    project = project_from_dict({"model": {"preset": "nano"}, "train": {"optimizer": "muon", **train},
                                 "deepspeed": {"zero_stage": stage}})
    plan = planner.plan_run(project, device=device, ranks=2, precision=precision)
    try:
        check_optimizer(project, plan)
    except GptError as error:
        return str(error)
    return None


def test_clipping_where_deepspeed_would_clip_muons_updates_is_one_sentence():
    """ZeRO 1-3 (but bf16's ZeRO-1, DeepSpeed's BF16_Optimizer) take the gradient norm after Muon: a clip would
    shrink its updates. Without a clip, at ZeRO-0, or in BF16_Optimizer every stage trains."""
    message = refusal(2, "fp32", device="cpu", grad_clip=1.0)
    assert message == ('train.optimizer = "muon" cannot clip gradients at deepspeed.zero_stage = 2 with fp32: '
                       "DeepSpeed takes the norm there after Muon has orthogonalised the matrices' gradients, so "
                       "train.grad_clip would shrink Muon's updates, not the gradients; set train.grad_clip = 0 (the "
                       "Muon recipe does not clip), or deepspeed.zero_stage = 0 where the gradients are clipped "
                       "before Muon.")
    assert "or 1 with bf16 on a GPU" in refusal(3, "bf16", grad_clip=0.5)
    assert refusal(1, "fp16", grad_clip=1.0) is not None
    for stage, precision in ((0, "fp32"), (0, "bf16"), (1, "bf16")):
        assert refusal(stage, precision, grad_clip=1.0) is None
    for stage in (1, 2, 3):
        assert refusal(stage, "fp32", grad_clip=0.0) is None


def test_zero3_is_told_to_reduce_without_reduce_scatter():
    from gptcli.batch import batch_layout
    from gptcli.train.engine import deepspeed_config

    def config(stage: int, optimizer: str, **deepspeed) -> dict:
        p = project_from_dict({"model": {"preset": "nano"}, "train": {"optimizer": optimizer},
                               "deepspeed": {"zero_stage": stage, **deepspeed}})
        return deepspeed_config(p, batch_layout(p.train, p.seq_len, 1), "bf16")["zero_optimization"]

    assert config(3, "muon")["reduce_scatter"] is False
    assert "reduce_scatter" not in config(2, "muon") and "reduce_scatter" not in config(3, "adamw")
    assert config(3, "muon", config={"zero_optimization": {"reduce_scatter": True}})["reduce_scatter"] is True


# --- the update (slow: DeepSpeed's import) ----------------------------------------------------------------------


def newton_schulz(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The Muon README's quintic iteration, in float64: the matrix over its Frobenius norm, then five steps of
    X ← aX + (bA + cA²)X with A = XXᵀ on the wide orientation (a, b, c = 3.4445, -4.7750, 2.0315)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_update(gradient: torch.Tensor, momentum: torch.Tensor, beta: float) -> torch.Tensor:
    """Muon's update of one matrix, written out: the momentum's running mean, Nesterov's look-ahead, then
    Newton–Schulz scaled by sqrt(max(1, rows / columns)). `momentum` is advanced in place."""
    momentum.mul_(beta).add_(gradient, alpha=1 - beta)
    look_ahead = (1 - beta) * gradient + beta * momentum
    rows, columns = gradient.shape
    return newton_schulz(look_ahead) * math.sqrt(max(1.0, rows / columns))


def cpu_newton_schulz_dtype(ns_method: str) -> torch.dtype:
    """The dtype DeepSpeed runs `ns_method`'s Newton–Schulz iteration in on the CPU, as its own
    `ns_compute_dtype` answers for its CPU accelerator: it depends on the CPU ("gram": fp16 where oneDNN has
    fp16, fp32 otherwise)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.runtime.zero.muon import original_muon

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(original_muon, "get_accelerator", CPU_Accelerator)
        return original_muon.ns_compute_dtype(ns_method)


@pytest.mark.slow
@pytest.mark.parametrize("ns_method", ["gram", "standard"])
def test_the_built_optimizers_update_is_newton_schulz_of_the_nesterov_momentum(ns_method, monkeypatch):
    """Three steps of the optimizer gptcli builds (CPU, fp32) on random gradients: each matrix moves by
    −lr·(Muon's update) after its decay, Muon's update computed here in float64, to the iteration's own
    precision: DeepSpeed runs "gram" in fp16 on a CPU whose oneDNN has fp16 (AVX512-FP16), else in fp32 (3e-5
    relative, the Gram form's restart against the plain form; fp16: 2e-2, 0.6% measured), and "standard" in bf16
    (8 bits of mantissa through five steps: 6e-2; 3.4% measured).
    A plain momentum-SGD step of the same look-ahead is far from it. AdamW's share takes exactly torch's
    AdamW step with [train]'s settings."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from gptcli.optimizers import Placement
    from gptcli.train.engine import parameter_groups

    tolerance = {torch.float32: 3e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}[cpu_newton_schulz_dtype(ns_method)]

    project = project_from_dict({"model": {"preset": "nano", "n_layer": 1}, "train": {
        "optimizer": "muon", "lr": 0.004, "weight_decay": 0.2, "beta1": 0.8, "eps": 1e-6,
        "optimizer_options": {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9, "ns_method": ns_method}}})
    torch.manual_seed(0)
    model = build_model(project.model)
    reference = build_model(project.model)
    reference.load_state_dict(model.state_dict())
    optimizer = MUON.build(parameter_groups(model, MUON, project.train), project.train, Placement("cpu"))
    adam_share = [p for name, p in reference.named_parameters() if not (name.startswith("h.") and p.dim() == 2)]
    adamw = torch.optim.AdamW([{"params": adam_share[:1], "weight_decay": 0.2}, {"params": adam_share[1:],
                              "weight_decay": 0.0}], lr=0.004, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    momenta = {name: torch.zeros_like(p) for name, p in model.named_parameters() if "h.0" in name and p.dim() == 2}
    for step in range(3):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for p, twin in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = torch.randn_like(p) * (step + 1)
            twin.grad = p.grad.clone()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
        with torch.compiler.set_stance("force_eager"):  # no inductor build on the CPU (engine.initialize)
            optimizer.step()
        adamw.step()
        for name, momentum in momenta.items():
            update = muon_update(gradients[name], momentum, beta=0.9)
            expected = before[name].double() * (1 - 0.05 * 0.1) - 0.05 * update
            moved = dict(model.named_parameters())[name].detach().double()
            assert (moved - expected).norm() / (0.05 * update.norm()) < tolerance, (name, step)
            look_ahead = (0.1 * gradients[name] + 0.9 * momentum).double()
            sgd = before[name].double() * (1 - 0.05 * 0.1) - 0.05 * look_ahead
            assert (moved - sgd).norm() > 0.5 * (moved - before[name]).norm(), (name, step)
        for (name, p), twin in zip(model.named_parameters(), reference.parameters(), strict=True):
            if name not in momenta:
                torch.testing.assert_close(p, twin, rtol=0, atol=0, msg=name)


# --- gpt train (slow) ---------------------------------------------------------------------------------------------

# NANO_RUN as Muon trains it: no dropout, so that step 1's gradients can be computed again here from the windows
# the run took; no warmup, so that step 1 runs at Muon's full rate; no clipping, which DeepSpeed would apply to
# Muon's updates at ZeRO-2 (refused); a checkpoint every step, so that the probes see step 1's state; micro batches
# of 4 × 64 tokens, so that the loss falls by half a nat in the four steps.
MUON_RUN = {**NANO_RUN, "model": {**NANO_RUN["model"], "dropout": 0.0},
            "train": {**NANO_RUN["train"], "optimizer": "muon", "max_steps": 4, "warmup_steps": 0, "grad_clip": 0.0,
                      "checkpoint_every": 1, "eval_every": 0, "micro_batch_size": 4, "seq_len": 64}}


def muon_project(directory: Path, shards: Path, *overrides: str) -> Path:
    return project_file(directory, shards, *overrides, base=MUON_RUN)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, shards) -> tuple[Path, Path]:
    """Four steps at ZeRO-2 with probes: the reference a killed and resumed run must repeat bit for bit."""
    directory = tmp_path_factory.mktemp("muon-zero2")
    project = muon_project(directory, shards)
    trained(project, probe=directory / "probe")
    return project, directory / "probe"


def first_step_gradients(project: Path, data: Path, probe: Path, initial: dict) -> dict[str, torch.Tensor]:
    """Step 1's gradients, computed here from the initial weights and the windows the run's loader handed out
    (the probe's list): the mean over the micro batches, as DeepSpeed accumulates them."""
    from gptcli.config import load_project
    from gptcli.data.loader import BatchLoader
    from gptcli.data.shards import open_prepared
    from gptcli.model import model_from_state_dict

    loaded = load_project(project)
    model = model_from_state_dict(loaded.model, {name: state["fp32"] for name, state in initial.items()
                                                 if name != "step"})
    accumulation = loaded.train.grad_accum_steps
    loader = BatchLoader(open_prepared(data), "train", loaded.train.micro_batch_size, loaded.seq_len)
    for line in (probe / "windows-rank0.jsonl").read_text().splitlines()[:accumulation]:
        windows = torch.from_numpy(np.stack([loader.window(i) for i in json.loads(line)["windows"]]).astype(np.int64))
        _, loss = model(windows[:, :-1], windows[:, 1:], return_logits=False)  # (B, T+1) → inputs, targets
        (loss / accumulation).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def assert_first_step_is_muons(project: Path, data: Path, probe: Path) -> None:
    """Each block matrix after step 1 is W·(1 − lr·0.01) − lr·NS(g)·scale with lr = 0.02 (warmup 0: the full
    rate; the first momentum is a multiple of g, which Newton–Schulz normalises away), within 1e-4 of the
    step relative where the iteration runs in fp32 (the gradients summed in another order) and 6e-2 where it
    runs in fp16 (2.4% measured); not the SGD step W − lr·g, which is farther off than half the step."""
    tolerance = {torch.float32: 1e-4, torch.float16: 6e-2}[cpu_newton_schulz_dtype("gram")]
    initial = torch.load(probe / "state-initialized-step00000000.pt")
    after = torch.load(probe / "state-saved-step00000001.pt")
    gradients = first_step_gradients(project, data, probe, initial)
    matrices = [name for name in gradients if name.startswith("h.") and gradients[name].dim() == 2]
    assert len(matrices) == 8
    for name in matrices:
        gradient, weight = gradients[name], initial[name]["fp32"].double()
        rows, columns = gradient.shape
        update = newton_schulz(gradient) * math.sqrt(max(1.0, rows / columns))
        expected = weight * (1 - 0.02 * 0.01) - 0.02 * update
        moved = after[name]["fp32"].double()
        assert (moved - expected).norm() / (0.02 * update.norm()) < tolerance, name
        assert (moved - (weight - 0.02 * gradient.double())).norm() > 0.5 * (moved - weight).norm(), name


@pytest.mark.slow
def test_at_zero0_a_muon_step_is_newton_schulz_of_the_gradient_not_sgd(tmp_path, shards):
    """ZeRO-0, where DeepSpeed's engine once ran Muon's matrices as plain SGD (DeepSpeed #8441): the matrices
    move by Muon's update, and the momentum buffer is the first step's (1 − 0.95)·g."""
    project = muon_project(tmp_path, shards, "deepspeed.zero_stage=0", "train.max_steps=1")
    result = train(project, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer: Muon on h.*.mlp.c_fc.weight" in result.stderr
    assert_first_step_is_muons(project, shards, tmp_path / "probe")
    initial = torch.load(tmp_path / "probe/state-initialized-step00000000.pt")
    after = torch.load(tmp_path / "probe/state-saved-step00000001.pt")
    gradients = first_step_gradients(project, shards, tmp_path / "probe", initial)
    torch.testing.assert_close(after["h.0.mlp.c_fc.weight"]["momentum_buffer"], 0.05 * gradients["h.0.mlp.c_fc.weight"],
                               rtol=0, atol=1e-7)
    assert "momentum_buffer" not in after["wte.weight"] and "exp_avg" in after["wte.weight"]


@pytest.mark.slow
def test_at_zero2_a_muon_step_is_newton_schulz_and_kill_9_resumes_bit_for_bit(tmp_path, shards, zero2_run):
    """ZeRO-2, where DeepSpeed orthogonalises while it fills the gradient partitions: step 1 is Muon's. Killed
    after step 2 and resumed, the losses are the uninterrupted run's bit for bit (the momentum came back with
    the checkpoint); the consolidated model is there."""
    reference, probe = zero2_run
    assert_first_step_is_muons(reference, shards, probe)
    expected = losses(reference.parent / "run")
    assert expected[-1] < expected[0] - 0.5
    project = muon_project(tmp_path, shards)
    killed = train(project, fault="kill@2")
    assert killed.returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "run") == expected
    assert (tmp_path / "run/model/model.safetensors").is_file()


@pytest.mark.slow
def test_two_rank_zero2_trains_and_another_number_of_ranks_is_one_sentence(tmp_path, shards):
    """Two ranks at ZeRO-2 learn; the universal format that moves state between numbers of ranks carries Adam's
    moments only, so resuming on one rank is refused in one sentence, before the conversion."""
    project = muon_project(tmp_path, shards, "train.max_steps=3")
    result = train(project, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = losses(tmp_path / "run")
    assert len(trained) == 3 and trained[-1] < trained[0] - 0.3
    muon_project(tmp_path, shards, "train.max_steps=4")
    refused = train(project, "--resume", "required")
    assert refused.returncode == 1
    assert 'carries Adam\'s moments only, not the "muon" optimizer\'s momentum_buffer; resume it on 2 rank(s).' in \
        " ".join(refused.stderr.split())
