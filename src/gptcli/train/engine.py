"""The DeepSpeed engine built from the project, on GPUs or on the CPU (ranks are started by launch.py).

On a machine without CUDA the same code runs on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo
collectives), so a laptop and CI exercise the path a GPU cluster runs. A single process started without a
launcher gets the torch.distributed variables of a one-rank world (otherwise DeepSpeed looks for MPI).
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from ..batch import BatchLayout
from ..config import ModelConfig, Project
from ..errors import GptError
from ..optimizers import ADAMW, OptimizerSpec, Placement, grouped_names, optimizer_spec
from ..planner import precision_for, training_model
from .launching.importing import import_muon_uncompiled
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


def deepspeed_config(project: Project, layout: BatchLayout, precision: str, device: str = "cpu") -> dict:
    """The DeepSpeed config from [deepspeed] and [train], with what the optimizer needs (its spec's
    deepspeed_settings); [deepspeed] config is merged over it last."""
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
    needed = optimizer_spec(project.train.optimizer).deepspeed_settings(placement(project, device, precision))
    return merge(merge(config, needed), ds.config)


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


def named_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each trainable parameter, in the model's order, a shared tensor once (the tied
    lm_head is wte): what an optimizer spec's grouping rule sees. Under ZeRO-3 a parameter's own tensor is
    this rank's empty placeholder; its shape is DeepSpeed's ds_shape."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: torch.nn.Module, spec: OptimizerSpec, train) -> list[dict]:
    """torch's parameter groups ({"params": [tensors], **settings}) as the spec groups the model's parameters."""
    tensors = dict(model.named_parameters())
    groups = grouped_names(spec, named_shapes(model), train)
    return [{"params": [tensors[name] for name in group.names], **group.options} for group in groups]


def group_names(model: torch.nn.Module, spec: OptimizerSpec, train) -> list[list[str]]:
    """The parameter names of each group, in the optimizer's order."""
    return [list(group.names) for group in grouped_names(spec, named_shapes(model), train)]


def placement(project: Project, device: str, precision: str = "fp32") -> Placement:
    """Where the optimizer runs (optimizers.Placement): the device, offload, ZeRO stage and precision."""
    ds = project.deepspeed
    return Placement(device=device, offload=ds.offload_optimizer and ds.zero_stage > 0, zero_stage=ds.zero_stage,
                     precision=precision)


def make_optimizer(model: torch.nn.Module, project: Project, device: str, precision: str = "fp32"):
    """The optimizer train.optimizer names, over the model's parameters as its spec groups them, built for
    where it runs (optimizers.py; AdamW's choice of kernel is ADAMW's builder)."""
    spec = optimizer_spec(project.train.optimizer)
    where = placement(project, device, precision)
    return spec.build(parameter_groups(model, spec, project.train), project.train, where)


def optimizer_note(project: Project, spec: OptimizerSpec) -> Optional[str]:
    """A note when the project sets [train] optimizer keys the chosen optimizer does not read."""
    unread = [key for key in ADAMW.train_keys if f"train.{key}" in project.given and key not in spec.train_keys]
    if not unread:
        return None
    return (f"note: train.optimizer {spec.name} does not read train.{', train.'.join(unread)} (it reads "
            f"{', '.join(spec.train_keys)}{' and train.optimizer_options' if spec.options else ''}).")


def optimizer_settings(project: Project, optimizer) -> dict:
    """What DeepSpeed must be told to take an optimizer it does not know (a plugin's): ZeRO refuses one it
    has not tested unless allowed, and ZeRO-Offload one that is not its CPU Adam unless told (the plugin's
    step then runs on the CPU copies, as its builder was told: Placement.offload)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    settings: dict = {}
    if project.deepspeed.zero_stage > 0 and not is_zero_supported_optimizer(optimizer):
        settings["zero_allow_untested_optimizer"] = True
    if project.deepspeed.offload_optimizer and not isinstance(optimizer, DeepSpeedCPUAdam):
        settings["zero_force_ds_cpu_optimizer"] = False
    return settings


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

    config = deepspeed_config(project, layout, precision, device)
    if load_universal:
        config = merge(config, {"checkpoint": {"load_universal": True}})
    if not compile_enabled(project, device):
        # Nothing is compiled then, DeepSpeed's own torch.compile'd kernels included (Muon's Newton–Schulz:
        # on the CPU inductor spends some 20-40 s per matrix shape, on 2 cores, before the first step).
        torch.compiler.set_stance("force_eager")
    optimizer = make_optimizer(model, project, device, precision)
    import_muon_uncompiled()  # after the optimizer: DeepSpeed's Muon, if it is one, keeps its compiled kernels
    config = merge(config, optimizer_settings(project, optimizer))
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    except (AssertionError, ValueError) as error:
        raise GptError(f"DeepSpeed refused the configuration: {error}") from None
    return engine
