"""The DeepSpeed engine built from the project, on GPUs or on the CPU (ranks are started by launch.py).

On a machine without CUDA the same code runs on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo
collectives), so a laptop and CI exercise the path a GPU cluster runs. A single process started without a
launcher gets the torch.distributed variables of a one-rank world (otherwise DeepSpeed looks for MPI).
"""

from __future__ import annotations

import copy
import os
import sys

import torch

from ..config import ModelConfig, Project
from ..errors import GptError
from ..batch import BatchLayout
from ..planner import precision_for, training_model  # noqa: F401
from .launching.launch import free_port


def device_type(project: Project) -> str:
    wanted = project.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise GptError('train.device is "cuda" but no CUDA device is visible to PyTorch.')
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def prepare_environment(device: str) -> None:
    """Environment DeepSpeed reads at import and init: the accelerator, and a one-rank world by default."""
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def resolve_precision(project: Project, device: str) -> str:
    precision = precision_for(project, device, device == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "fp16" and device == "cpu":
        raise GptError('train.precision "fp16" needs a GPU; use "fp32" (or "bf16") on the CPU.')
    return precision


def deepspeed_config(project: Project, layout: BatchLayout, precision: str) -> dict:
    """The DeepSpeed config from [deepspeed] and [train]; [deepspeed] config is merged over it last."""
    ds = project.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "train_batch_size": layout.sequences_per_step,
        # fp32 ZeRO-0: the loop clips (see loop_clips_gradients), so DeepSpeed must not clip again.
        "gradient_clipping": 0.0 if loop_clips_gradients(project, precision) else project.train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # our own logging; DeepSpeed's would interleave with it
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device at the start of every
        # forward and the end of every step; the loop measures tokens/s itself. Re-enable it through
        # [deepspeed] config = { timers = { throughput = { enabled = true } } }.
        "timers": {"throughput": {"enabled": False}},
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
        if ds.zero_stage > 0:
            # Sum the micro batches' gradients in fp32, not bf16 (whose 8-bit mantissa drops small
            # contributions): DeepSpeed's BF16_Optimizer at stage 1, the ZeRO optimizers' fp32 buffers at
            # 2-3. Stage 0 has no such option in DeepSpeed (it refuses the key); see precision_note.
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        # Dynamic loss scaling from 2^16 (DeepSpeed's default recipe): overflowing steps are skipped.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return merge(config, ds.config)


def loop_clips_gradients(project: Project, precision: str) -> bool:
    """fp32 at ZeRO-0 is the one setting where DeepSpeed neither reports the gradient norm nor refuses a
    non-finite update (it clips and steps regardless), so there the loop clips itself, before the step,
    and sees the norm in time to stop before a non-finite update."""
    return precision == "fp32" and project.deepspeed.zero_stage == 0


def precision_note(project: Project, precision: str) -> Optional[str]:
    """What the user should know about the precision this run will use, or None."""
    if precision == "bf16" and project.deepspeed.zero_stage == 0:
        return ("note: bf16 at ZeRO-0 sums gradients in bf16 (DeepSpeed has no fp32 accumulation at stage 0); "
                "deepspeed.zero_stage = 1 sums them in fp32 (in a buffer of 4 bytes per parameter).")
    return None


def merge(base: dict, override: dict) -> dict:
    """Nested dict merge: `override` wins, tables are merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the 2-D weight matrices (attention, MLP, wte = the tied lm_head) only; biases,
    LayerNorm gains and the position embedding wpe are not decayed (as GPT-2 reproductions do: decay
    shrinks what multiplies activations, not offsets, scales or a position lookup)."""
    decay, no_decay, seen = [], [], set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decay if parameter.dim() >= 2 and not name.startswith("wpe.") else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, project: Project, device: str):
    """AdamW: DeepSpeed's CPU Adam when the optimizer state is offloaded; on a GPU DeepSpeed's FusedAdam
    when it was built into the installed DeepSpeed, else torch's fused AdamW (never a JIT build of
    FusedAdam: minutes of nvcc, and a hang on a build lock a killed run left behind); on the CPU torch's
    single-tensor AdamW (deterministic element by element, so resume is exact)."""
    train = project.train
    groups = parameter_groups(model, train.weight_decay)
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    if project.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if device == "cuda":
        if fused_adam_prebuilt():
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def fused_adam_prebuilt() -> bool:
    """Whether DeepSpeed's FusedAdam loads without compiling: pip built it in (DS_BUILD_FUSED_ADAM=1) for
    this accelerator. The same test DeepSpeed's OpBuilder.load makes before it falls back to a JIT build."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    return bool(installed_ops.get("fused_adam")) and accelerator_name == get_accelerator()._name


def compile_enabled(project: Project, device: str) -> bool:
    """train.compile: "auto" compiles on CUDA (where it pays) and not on the CPU (where compiling takes
    longer than a small run)."""
    wanted = project.train.compile
    return device == "cuda" if wanted == "auto" else bool(wanted)


def prepare_device(device: str) -> None:
    """Per-process CUDA settings: TF32 tensor cores for fp32 matmuls and convolutions (the fp32 parts of a
    mixed-precision step and fp32 runs; about 8x an fp32 matmul's throughput on A100/H100, 10-bit mantissa
    products with fp32 accumulation)."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def training_model_config(project: Project, device: str) -> ModelConfig:
    """The model config a run trains (planner.training_model: GPT-2 presets padded to 50,304 rows on a GPU)."""
    return training_model(project, device)


def initialize(project: Project, model: torch.nn.Module, layout: BatchLayout, precision: str, device: str,
               load_universal: bool = False):
    """deepspeed.initialize over the model; returns the engine. `load_universal`: it will load a checkpoint
    converted to DeepSpeed's universal format (resuming on another number of ranks: reshard.py)."""
    import deepspeed

    config = deepspeed_config(project, layout, precision)
    if load_universal:
        config = merge(config, {"checkpoint": {"load_universal": True}})
    optimizer = make_optimizer(model, project, device)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    except (AssertionError, ValueError) as error:
        raise GptError(f"DeepSpeed refused the configuration: {error}") from None
    return engine
