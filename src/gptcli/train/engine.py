"""The DeepSpeed engine built from the project, on GPUs or on the CPU (ranks are started by launch.py).

On a machine without CUDA the same code runs on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo
collectives), so a laptop and CI exercise the path a GPU cluster runs. A single process started without a
launcher gets the torch.distributed variables of a one-rank world (otherwise DeepSpeed looks for MPI).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass

import torch

from ..config import Project
from ..errors import GptError
from .launch import free_port


@dataclass
class BatchLayout:
    """How one optimizer step is made of sequences."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    seq_len: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


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
    precision = project.train.precision
    if precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise GptError('train.precision "fp16" needs a GPU; use "fp32" (or "bf16") on the CPU.')
    return precision


def resolve_seq_len(project: Project) -> int:
    seq_len = project.train.seq_len or project.model.block_size
    if seq_len > project.model.block_size and project.model.position == "learned":
        raise GptError(f"train.seq_len ({seq_len}) exceeds model.block_size ({project.model.block_size}).")
    return seq_len


def batch_layout(project: Project, world_size: int) -> BatchLayout:
    """micro × accumulation × ranks; with train.global_batch_tokens the accumulation is derived from it."""
    train, seq_len = project.train, resolve_seq_len(project)
    accum = train.grad_accum_steps
    if train.global_batch_tokens:
        per_micro_step = train.micro_batch_size * seq_len * world_size
        if train.global_batch_tokens % per_micro_step:
            raise GptError(f"train.global_batch_tokens ({train.global_batch_tokens:,}) is not a multiple of "
                           f"micro_batch_size × seq_len × ranks = {train.micro_batch_size} × {seq_len} × "
                           f"{world_size} = {per_micro_step:,}.")
        accum = train.global_batch_tokens // per_micro_step
    return BatchLayout(train.micro_batch_size, accum, world_size, seq_len)


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
        "gradient_clipping": project.train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # our own logging; DeepSpeed's would interleave with it
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        # Dynamic loss scaling from 2^16 (DeepSpeed's default recipe): overflowing steps are skipped.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return merge(config, ds.config)


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
    """AdamW: DeepSpeed's fused Adam on a GPU, its CPU Adam when the optimizer state is offloaded, and
    torch's single-tensor AdamW on the CPU (deterministic element by element, so fp32 resume is exact)."""
    train = project.train
    groups = parameter_groups(model, train.weight_decay)
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    if project.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if device == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except Exception as error:  # the op is built on first use and needs the CUDA toolkit
            print(f"note: DeepSpeed's FusedAdam is unavailable ({type(error).__name__}); using torch's fused AdamW.",
                  file=sys.stderr)
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def initialize(project: Project, model: torch.nn.Module, layout: BatchLayout, precision: str, device: str):
    """deepspeed.initialize over the model; returns the engine."""
    import deepspeed

    config = deepspeed_config(project, layout, precision)
    optimizer = make_optimizer(model, project, device)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    except (AssertionError, ValueError) as error:
        raise GptError(f"DeepSpeed refused the configuration: {error}") from None
    return engine
