"""The planner against what PyTorch and DeepSpeed really hold.

Activations: the bytes autograd keeps for the backward pass, measured with saved_tensors_hooks (each
storage counted once, parameters left out), for nano- to GPT-2-sized layers, fp32 and bf16 models, dropout
on and off, checkpointing on and off, SDPA's causal path and a materialised mask, and the planner's
estimate within 10% of each (in practice it is exact: docs/planning.md). The peak of a whole forward and
backward pass, measured with torch's MemTracker, within 10%. Model states: DeepSpeed's own estimators
within 5% where they apply, and (slow) DeepSpeed engines on the CPU measured phase by phase.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_user_error, gpt_env, module_parameter_components, run_gpt, worker_port
from gptcli import planner
from gptcli.config import apply_overrides, project_from_dict
from gptcli.errors import GptError
from gptcli.presets import PRESETS

TOLERANCE = 0.10  # the bound for activations; the model-state bound against DeepSpeed is 5%


def model_config(**keys):
    return project_from_dict({"model": keys}).model


def kept_for_backward(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the storages autograd saves in one forward pass with the loss, each storage once,
    parameters left out (they are the model's weights, not activations)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(idx, targets, return_logits=False)
    return sum(seen.values())


def built(config, dtype: torch.dtype, checkpointing: bool):
    from gptcli.model import build_model

    torch.manual_seed(0)
    model = build_model(config).to(dtype)
    model.train()
    model.activation_checkpointing = checkpointing
    return model


def planned_step(config, batch: int, seq_len: int, dtype: torch.dtype, checkpointing: bool):
    """The planner's activation memory for one step of `config`, and the model and batch to measure it on."""
    model = built(config, dtype, checkpointing)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    targets = torch.randint(0, config.vocab_size, (batch, seq_len))
    shape = planner.ActivationShape(batch, seq_len, 2 if dtype == torch.bfloat16 else 4, "cpu", config.dropout,
                                    checkpointing, config.attention != "causal")
    return planner.activation_memory(config, shape), (model, idx, targets)


def measured_and_planned(config, batch: int, seq_len: int, dtype: torch.dtype, checkpointing: bool):
    """planned_step, with what autograd keeps in one forward pass of that step (kept_for_backward)."""
    planned, (model, idx, targets) = planned_step(config, batch, seq_len, dtype, checkpointing)
    return kept_for_backward(model, idx, targets), planned, (model, idx, targets)


# (layers, width, heads, vocabulary, context) and (B, T): nano-sized blocks, a GPT-2 layer.
SHAPES = {"nano": (dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, block_size=64), (4, 64)),
          "gpt2 layer": (dict(n_layer=1, n_embd=768, n_head=12, vocab_size=512, block_size=128), (2, 128))}
CASES = [(shape, dtype, dropout, checkpointing, mask)
         for shape in SHAPES for dtype in (torch.float32, torch.bfloat16) for dropout in (0.0, 0.1)
         for checkpointing in (False, True) for mask in (False, True)
         if shape == "nano" or (checkpointing == mask)]


@pytest.mark.parametrize("shape, dtype, dropout, checkpointing, mask", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_kept_activations_match_what_autograd_saves(shape, dtype, dropout, checkpointing, mask):
    keys, (batch, seq_len) = SHAPES[shape]
    attention = {"attention": "sliding_window", "sliding_window": seq_len // 2} if mask else {}
    config = model_config(**keys, dropout=dropout, **attention)
    measured, planned, _ = measured_and_planned(config, batch, seq_len, dtype, checkpointing)
    assert planned.kept == pytest.approx(measured, rel=TOLERANCE), (measured, planned.kept)


VARIANTS = [dict(norm_position="post", final_norm=False), dict(activation="relu"), dict(activation="gelu"),
            dict(activation="silu"), dict(position="rotary"), dict(bias=False), dict(tie_embeddings=False),
            dict(mlp_ratio=2), dict(vocab_multiple=64, vocab_size=500)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_kept_activations_of_every_architecture_option(variant):
    config = model_config(**{**SHAPES["nano"][0], **variant})
    for dtype, dropout in ((torch.float32, 0.0), (torch.bfloat16, 0.1)):
        config.dropout = dropout
        measured, planned, _ = measured_and_planned(config, 4, 64, dtype, False)
        assert planned.kept == pytest.approx(measured, rel=TOLERANCE), (dtype, measured, planned.kept)


@pytest.mark.parametrize("batch, vocab_multiple", [(4, 1), (24, 1), (24, 128)], ids=["whole", "chunked", "padded"])
def test_the_loss_keeps_fp32_log_probabilities_or_the_logits_when_chunked(batch, vocab_multiple):
    """The full GPT-2 vocabulary: up to LOSS_CHUNK_VALUES the loss keeps N×V fp32 log-probabilities, above
    only the bf16 logits (the padded lm_head output when the vocabulary is padded)."""
    config = model_config(preset="nano", vocab_multiple=vocab_multiple)
    measured, planned, _ = measured_and_planned(config, batch, 64, torch.bfloat16, False)
    assert planned.kept == pytest.approx(measured, rel=TOLERANCE)
    assert (batch * 64 > planner.loss_rows_per_chunk(50257)) == (planned.terms["loss"] < batch * 64 * 50257 * 4)


def peak_of_a_step(model, idx, targets) -> int:
    """Peak bytes of activations and temporaries in one forward+backward (weights and their gradients out)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, idx, targets)
    with tracker:
        _, loss = model(idx, targets, return_logits=False)
        loss.backward()
    peak = {str(k).rsplit(".", 1)[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return peak["Total"] - peak["PARAM"] - peak["GRAD"]


@pytest.mark.parametrize("keys, batch, checkpointing", [
    (dict(preset="nano"), 4, False),  # the loss's backward is the peak
    pytest.param(dict(n_layer=2, n_embd=128, n_head=4, vocab_size=64, block_size=64), 4, False,  # a block's backward
                 marks=pytest.mark.slow),
    (dict(n_layer=2, n_embd=128, n_head=4, vocab_size=64, block_size=64), 4, True),  # a block recomputed
], ids=["loss", "block", "recomputed block"])
def test_the_peak_of_a_forward_and_backward_pass(keys, batch, checkpointing):
    config = model_config(**keys)
    for dtype in (torch.float32, torch.bfloat16):
        planned, (model, idx, targets) = planned_step(config, batch, config.block_size, dtype, checkpointing)
        assert planned.peak == pytest.approx(peak_of_a_step(model, idx, targets), rel=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [24, 42], ids=["two chunks", "three chunks"])
def test_the_peak_of_the_chunked_loss(batch):
    """Chunks of loss_rows_per_chunk(50,257) = 1,335 rows: 24 × 64 rows are two of them, 42 × 64 three, the
    fewest from which the backward pass's peak takes its other form (planner/activations.loss_terms). The
    chunks depend on the vocabulary alone: nano 16 wide instead of 64 has the same ones, at a quarter of the
    head's products (bf16 products are slow on most CPUs)."""
    config = model_config(preset="nano", n_embd=16)
    for dtype in (torch.float32, torch.bfloat16):
        planned, (model, idx, targets) = planned_step(config, batch, 64, dtype, False)
        assert planned.peak == pytest.approx(peak_of_a_step(model, idx, targets), rel=TOLERANCE)


def test_the_loss_chunk_is_the_models():
    from gptcli import model

    assert planner.LOSS_CHUNK_VALUES == model.LOSS_CHUNK_VALUES


# --- parameters and FLOPs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_arithmetic_counts_the_parameters_the_model_builds(preset):
    from gptcli.model import build_model, initialisation_skipped

    for variant in ({}, *VARIANTS[:8], dict(vocab_multiple=128)):
        config = model_config(preset=preset, **{k: v for k, v in variant.items() if k != "vocab_size"})
        with initialisation_skipped():
            model = build_model(config, device="meta")
        assert planner.parameter_tensors(config) == {name: p.numel() for name, p in model.named_parameters()}
        assert planner.parameter_components(config) == module_parameter_components(model)


def test_flops_per_token_of_gpt2():
    # 6N + 12·L·H·D·T with N = all parameters but the 1024·768 position embedding, T = 1024.
    assert planner.flops_per_token(model_config(preset="gpt2"), 1024) == \
        6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024


# --- model states against DeepSpeed's estimators ---------------------------------------------------------------


def training(preset: str, stage: int, ranks: int, **keys) -> planner.Training:
    project = project_from_dict({"model": {"preset": preset}, "deepspeed": {"zero_stage": stage, **keys}})
    return planner.training_for(project, "cuda", ranks, "bf16")


@pytest.fixture(scope="module")
def deepspeed_estimators():
    """DeepSpeed's own model-state estimators (importing DeepSpeed on its CPU accelerator, which it reads from
    DS_ACCELERATOR when first imported; the variable is set for this module's tests only)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DS_ACCELERATOR", "cpu")
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        yield estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs, model_to_params


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-xl"])
@pytest.mark.parametrize("ranks", [1, 8, 64])
def test_model_states_agree_with_deepspeeds_estimators(deepspeed_estimators, preset, ranks):
    """estimate_zero2_model_states_mem_needs counts 2 bytes of 16-bit weights per parameter and 18 per
    partitioned parameter (16-bit and fp32 gradients 2 + 4, fp32 master 4, moments 8); gptcli's plan holds
    the 16-bit gradients in the reduce bucket it counts at its configured size, so they are added here as
    DeepSpeed assumes them. estimate_zero3_model_states_mem_needs: 18 partitioned (16-bit weights 2, fp32
    gradients 4, master 4, moments 8) plus 4 bytes per parameter of the largest layer, which it allows
    for gathering."""
    zero2, zero3, _ = deepspeed_estimators
    for stage, estimator in ((2, zero2), (3, zero3)):
        t = training(preset, stage, ranks)
        P, Pn = planner.held_parameters(t), planner.partition(t)
        step = planner.model_state_phases(t)[-1].terms  # the optimizer step: every model state exists
        states = step["weights"] + step["optimizer states"] + step["gradients"]
        if stage == 2:
            _, gpu = estimator(P, num_gpus_per_node=ranks, cpu_offload=False)
            assert states + 2 * Pn == pytest.approx(gpu, rel=0.05)
        else:
            _, gpu, largest = estimator(P, planner.largest_layer(t), num_gpus_per_node=ranks, cpu_offload=False)
            assert states + largest == pytest.approx(gpu, rel=0.05)
    offloaded = planner.state_layout(training(preset, 2, ranks, offload_optimizer=True))
    _, gpu = zero2(planner.held_parameters(t), num_gpus_per_node=ranks, cpu_offload=True)
    assert offloaded.resident["weights"] + offloaded.resident["optimizer states"] == pytest.approx(gpu, rel=0.05)


@pytest.mark.parametrize("keys", [dict(preset="tiny"), dict(preset="nano", tie_embeddings=False),
                                  dict(preset="openai-gpt", n_layer=1)], ids=["tiny", "nano untied", "gpt-1 layer"])
def test_parameters_and_largest_layer_as_deepspeed_counts_them(deepspeed_estimators, keys):
    """DeepSpeed's model_to_params (ZeRO-3's estimator input) on a built model: shared tensors once."""
    from gptcli.model import build_model

    config = model_config(**keys)
    t = planner.Training(model=config, seq_len=config.block_size, ranks=1, precision="bf16", zero_stage=3)
    assert deepspeed_estimators[2](build_model(config)) == (planner.held_parameters(t), planner.largest_layer(t))


def test_zero_stages_shrink_what_each_rank_holds():
    def model_states(stage: int, ranks: int) -> int:
        step = planner.model_state_phases(training("gpt2", stage, ranks))[-1].terms
        return step["weights"] + step["gradients"] + step["optimizer states"]

    assert model_states(3, 8) < model_states(2, 8) < model_states(1, 8) < model_states(0, 8)
    # On one rank partitioning saves nothing; bf16 ZeRO-1 keeps a full fp32 gradient buffer besides.
    assert model_states(1, 1) > model_states(2, 1) == model_states(3, 1)
    # DeepSpeed's default reduce bucket (5e8 elements) is a fixed cost, whatever the model's size.
    bucket = planner.state_layout(training("nano", 3, 1)).resident["communication buffers"]
    assert bucket == 2 * 500_000_000
    small = planner.state_layout(training("nano", 3, 1, config={"zero_optimization": {"reduce_bucket_size": 10**6}}))
    assert small.resident["communication buffers"] == 2 * 10**6


def test_the_optimizer_states_are_the_fp32_masters_and_the_specs_own_bytes():
    """AdamW keeps the paper's 12 bytes (4 of masters, its 8 of moments; 8 alone at fp32 ZeRO-0, where it
    updates the weights themselves); an optimizer of 4 bytes (the example plugin's momentum) 8 and 4. On the
    CPU the step's temporaries are the spec's too (torch's single-tensor AdamW: 8 bytes per element)."""
    import dataclasses

    from gptcli.optimizers import optimizer_spec

    sgd = optimizer_spec(f"{REPO / 'examples/plugins/gptcli_example_plugins/optimizer.py'}:OPTIMIZER")
    for stage, precision, adamw_bytes, sgd_bytes in ((1, "bf16", 12, 8), (3, "bf16", 12, 8), (0, "fp32", 8, 4)):
        project = project_from_dict({"model": {"preset": "gpt2"}, "deepspeed": {"zero_stage": stage}})
        adamw = planner.training_for(project, "cuda", 8, precision)
        held = planner.held_parameters(adamw) if stage == 0 else planner.partition(adamw)
        assert planner.state_layout(adamw).resident["optimizer states"] == adamw_bytes * held
        plugin = dataclasses.replace(adamw, optimizer=sgd)
        assert planner.state_layout(plugin).resident["optimizer states"] == sgd_bytes * held
    on_cpu = planner.training_for(project_from_dict({"model": {"preset": "nano"}}), "cpu", 1, "fp32")
    step = planner.state_layout(on_cpu).step["temporaries"]
    assert step - planner.state_layout(dataclasses.replace(on_cpu, optimizer=sgd)).step["temporaries"] == \
        (8 - 4) * planner.partition(on_cpu)
    assert planner.zero_memory_per_gpu(1000, 1)["zero0"] == 16_000
    assert planner.zero_memory_per_gpu(1000, 1, sgd)["zero0"] == 12_000


@pytest.mark.slow
@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("fp32", 1), ("fp32", 2), ("bf16", 0), ("bf16", 1),
                                              ("bf16", 2), ("bf16", 3)])
def test_deepspeed_on_the_cpu_holds_what_the_plan_says(stage, precision):
    """Two optimizer steps of a DeepSpeed engine on the CPU (bench/plan_memory.py), measured phase by phase
    with MemTracker: the planner's forward+backward and optimizer-step peaks within 10%. Every stage in both
    precisions but ZeRO-3 in fp32: one layout (planner/states.stage3_layout) and one DeepSpeed optimizer hold
    both precisions there, and bf16 (16-bit weights beside the fp32 masters) is the one with more terms."""
    configs = [f"model.preset=nano train.micro_batch_size=4 deepspeed.zero_stage={stage} train.precision={precision}"]
    if (stage, precision) in ((1, "fp32"), (2, "fp32"), (1, "bf16")):
        # A reduce bucket smaller than the model, and gradient accumulation: ZeRO-1's and ZeRO-2's paths of
        # DeepSpeed's ZeRO optimizer, and bf16 ZeRO-1's BF16_Optimizer (bf16 ZeRO-2 is the ZeRO-2 path again,
        # in 16-bit elements).
        configs.append(configs[0] + " train.grad_accum_steps=2 deepspeed.config={zero_optimization={reduce_bucket_size=1000000}}")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "plan_memory.py"), "--json", *configs],
                            capture_output=True, text=True, timeout=1800,
                            env=gpt_env({"DS_ACCELERATOR": "cpu", "MASTER_PORT": str(worker_port())}))
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.splitlines():
        row = json.loads(line)
        for phase, measured in row["measured"].items():
            assert row["planned"][phase] == pytest.approx(measured, rel=TOLERANCE), (row["overrides"], phase)


# --- fits, micro batches, GPUs ----------------------------------------------------------------------------------


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    t = training("gpt2", 1, 1)
    for capacity in (8 * 2**30, 24 * 2**30, 80 * 2**30):
        for checkpointing in (False, True):
            largest = planner.largest_micro_batch(t, capacity, checkpointing)  # accumulating gradients
            assert planner.memory_plan(t, largest, checkpointing, grad_accum_steps=2).required <= capacity
            assert planner.memory_plan(t, largest + 1, checkpointing, grad_accum_steps=2).required > capacity
            alone = planner.largest_micro_batch(t, capacity, checkpointing, per_rank=largest)  # its own step
            assert alone >= largest
    assert planner.largest_micro_batch(t, 2 * 2**30, False) == 0  # the model states alone do not fit


def test_the_plan_suggests_a_micro_batch_that_divides_the_step():
    project = project_from_dict(apply_overrides({}, ["model.preset=gpt2", "train.global_batch_tokens=524288",
                                                     "train.micro_batch_size=8"]))
    gpu = planner.find_gpu("H100-80GB")
    plan = planner.plan_run(project, gpu=gpu, capacity=gpu.memory)
    per_rank = 512
    assert plan.layout.micro_batch_size * plan.layout.grad_accum_steps == per_rank
    best = plan.suggestion.micro_batch_size
    assert per_rank % best == 0 and best <= plan.largest[False] and 2 * best > plan.largest[False]
    auto = planner.plan_run(project, gpu=gpu, capacity=gpu.memory, micro_batch="auto")
    assert auto.layout.micro_batch_size == best and auto.fits
    mfu, _ = planner.mfu_for(gpu, "bf16", plan.parameters)  # Hopper's figure for 124M parameters
    assert plan.mfu == mfu == 0.30
    assert plan.step_seconds == pytest.approx(plan.flops_per_token * 524288 / (989e12 * mfu))


@pytest.mark.parametrize("name, found", [("H100-80GB", "H100-SXM"), ("h100", "H100-SXM"), ("A100 40GB", "A100-40GB"),
                                         ("rtx 4090", "RTX-4090"), ("L4", "L4"), ("v100", "V100-16GB")])
def test_gpus_are_found_by_name_case_and_separators_ignored(name, found):
    assert planner.find_gpu(name).name == found


def test_an_unknown_gpu_is_one_sentence_with_close_names():
    with pytest.raises(GptError, match=r'Unknown GPU "H10" \(did you mean H100-PCIe, H100-NVL, H100-SXM\?\)'):
        planner.find_gpu("H10")
    with pytest.raises(GptError, match="known: H100-PCIe, .*--gpu-memory"):
        planner.find_gpu("TPUv5")


@pytest.mark.parametrize("text, size", [("80GiB", 80 * 2**30), ("24 GB", 24 * 10**9), ("81920MiB", 80 * 2**30),
                                        ("8e10", 8 * 10**10), ("0.5tib", 2**39)])
def test_memory_sizes_read_with_their_units(text, size):
    assert planner.parse_memory(text) == size


@pytest.mark.parametrize("text", ["80 GiBs", "-1GB", "lots", "0"])
def test_a_bad_memory_size_is_one_sentence(text):
    with pytest.raises(GptError, match="--gpu-memory must be a size such as 80GiB"):
        planner.parse_memory(text)


def test_gpu_names_from_torch_find_their_table_entry():
    for device_name, gpu in [("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
                             ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
                             ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
                             ("Tesla V100-SXM2-32GB", "V100-32GB"), ("NVIDIA GeForce RTX 3090", "RTX-3090")]:
        assert planner.gpu_for_device_name(device_name).name == gpu
    assert planner.gpu_for_device_name("NVIDIA GeForce GTX 1080") is None


def test_a_run_that_does_not_fit_names_the_change_that_would():
    def change(overrides, capacity):
        project = project_from_dict(apply_overrides({}, overrides))
        plan = planner.plan_run(project, capacity=capacity)
        assert plan.fits is False
        return planner.fitting_change(project, plan)

    gpt2 = ["model.preset=gpt2", "train.micro_batch_size=64", "train.grad_accum_steps=2"]
    largest = planner.largest_micro_batch(training("gpt2", 1, 1), 24 * 2**30, False, per_rank=128)
    best = max(m for m in range(1, largest + 1) if 128 % m == 0)
    assert change(gpt2, 24 * 2**30) == (f"train.micro_batch_size = {best} with train.grad_accum_steps = {128 // best} "
                                       "(the same 128 sequences per rank per step)")
    t = training("gpt2", 1, 1)
    between = (planner.memory_plan(t, 1, False, 64).required + planner.memory_plan(t, 1, True, 64).required) // 2
    assert change(gpt2, between) == ("train.micro_batch_size = 1 with train.grad_accum_steps = 128 with "
                                     "train.activation_checkpointing = true (the same 128 sequences per rank per step)")
    assert "offload_optimizer" in change(["model.preset=gpt2-xl", "train.micro_batch_size=1"], 24 * 2**30)
    assert "more GPUs" in change(["model.preset=gpt2-xl", "train.micro_batch_size=1"], 2 * 2**30)


# --- gpt inspect-params ------------------------------------------------------------------------------------------


def inspect(*args: str):
    """`gpt inspect-params ARGS` in this process (the CLI's own parsing and rendering; no interpreter start)."""
    from typer.testing import CliRunner

    from gptcli.cli import app

    return CliRunner().invoke(app, ["inspect-params", *args], env={"COLUMNS": "200"})


def test_inspect_params_plans_the_run_on_a_gpu_in_json():
    result = inspect("gpt2", "--gpu", "H100-80GB", "--micro-batch", "auto", "--set", "train.global_batch_tokens=524288",
                     "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"name", "total", "reference", "matches", "components", "flops_per_token", "memory_per_gpu"} <= set(report)
    plan = report["plan"]
    memory = plan["memory"]
    assert plan["gpu"] == "H100-SXM" and plan["precision"] == "bf16" and memory["fits"] is True
    assert memory["capacity"] == 81089 * 2**20  # what torch reports on an H100 SXM, not the data sheet's 80 GB
    terms = [memory[key] for key in ("weights", "gradients", "optimizer_states", "activations") if key in memory]
    assert memory["peak"] == sum(terms) + memory.get("communication_buffers", 0) + memory.get("temporaries", 0)
    assert memory["required"] == memory["peak"] + memory["allowance"] <= memory["capacity"]
    assert plan["micro_batch"] == plan["suggested"]["micro_batch"] <= plan["largest_micro_batch"]["without_checkpointing"]
    assert plan["micro_batch"] * plan["grad_accum_steps"] == 512
    assert plan["time"]["seconds_per_step"] > 0 and plan["time"]["mfu"] == 0.3


def test_inspect_params_human_plan_and_its_options():
    result = inspect("gpt2-xl", "--gpu-memory", "24GB", "--gpus", "2", "--mfu", "0.45")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "memory per GPU at the peak" in text and "does not fit" in text and "2 GPU(s)" in text
    assert "bf16, AdamW, ZeRO stage 1" in text and "mixed-precision AdamW, 2 GPU(s)" in text  # the spec's words
    assert "45% MFU" not in text  # no peak FLOP/s without a GPU from the table: no time
    assert "time: give --gpu NAME" in text
    assert_user_error(run_gpt("inspect-params", "gpt2", "--gpu", "H10"), 'Unknown GPU "H10"', "H100-SXM")


@pytest.mark.parametrize("options, message", [
    (dict(gpu_memory="lots"), "--gpu-memory must be a size"), (dict(mfu=1.5), "--mfu must be a fraction"),
    (dict(micro_batch="many"), "--micro-batch must be"), (dict(micro_batch="auto"), "--micro-batch auto needs"),
    (dict(micro_batch="3"), "--micro-batch 3 does not divide the 8 sequences")])
def test_inspect_params_plan_options_are_checked_in_one_place(options, message):
    from gptcli.inspect import PlanRequest, inspect_command

    with pytest.raises(GptError, match=message):
        inspect_command("gpt2", None, [], request=PlanRequest(**options))


def test_plan_options_need_one_model(tmp_path, monkeypatch):
    from gptcli.inspect import PlanRequest, inspect_command

    monkeypatch.chdir(tmp_path)  # no run.toml here
    with pytest.raises(GptError, match="name a preset"):
        inspect_command(None, None, [], request=PlanRequest(gpu="H100"))
