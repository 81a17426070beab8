"""What `gpt train` is about to do, said before the slow parts start: the model and its size, where it
runs, how many tokens, and roughly how long that takes.

The estimate is the run's FLOP count (`gpt inspect-params`' FLOPs per token) over a rate this machine
can sustain: on a CPU a short matmul timed here, on a GPU its data-sheet peak times a typical MFU. It is
meant to tell minutes from days before anything is spent; the live ETA takes over after a few steps.
Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import ModelConfig, Project, project_from_dict
from ..presets import PRESETS

# Training on a CPU reaches about half the rate of a large square fp32 matmul (measured on 2 cores:
# nano ~54 and GPT-2 124M ~56 GFLOP/s against ~110 for 1024×1024 matmuls); 0.4 keeps the estimate on
# the long side rather than the short one.
CPU_TRAINING_EFFICIENCY = 0.4
# Well-tuned GPT-2 training reaches 30-50% MFU on A100/H100; a first run, untuned, sits at the low end.
GPU_TYPICAL_MFU = 0.3
# Data sheets: fp32 without tensor cores is about 1/16 of the dense bf16 peak (A100 19.5 vs 312
# TFLOP/s, H100 SXM 67 vs 989).
GPU_FP32_FRACTION = 1 / 16
# A run estimated at more than this on a CPU gets the advice to start smaller.
LONG_CPU_RUN_SECONDS = 3600.0
# The CPU-sized presets, largest first: the first one whose run fits is the one named.
SMALL_PRESETS = ("tiny", "nano")


@dataclass
class Plan:
    """The run as configured: what is trained, where, and on how many tokens."""

    model_name: str
    parameters: int
    flops_per_token: int
    device: str
    precision: str
    zero_stage: int
    ranks: int
    sequences_per_step: int
    seq_len: int
    steps: int  # still to run
    eval_tokens: int  # forward-only tokens of all evaluations still to run
    steps_done: int = 0  # by the checkpoint this run resumes from
    resume_tag: Optional[str] = None

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def total_flops(self) -> float:
        # An evaluation token is a forward pass only: a third of the 6N training FLOPs.
        return float(self.flops_per_token) * (self.total_tokens + self.eval_tokens / 3)


def model_name(config: ModelConfig) -> str:
    """The preset's name only when the model has that preset's shape; otherwise "custom" (with the
    preset it started from, or the preset it happens to equal)."""
    shape = config.architecture_dict()
    if config.preset in PRESETS:
        if preset_shape(config.preset) == shape:
            return config.preset
        return f"custom (changed from {config.preset})"
    same = [name for name in PRESETS if preset_shape(name) == shape]
    return f"custom (the shape of {same[0]})" if same else "custom"


def preset_shape(name: str) -> dict:
    return preset_model(name).architecture_dict()


def preset_model(name: str, vocab_size: Optional[int] = None) -> ModelConfig:
    model = {"preset": name} if vocab_size is None else {"preset": name, "vocab_size": vocab_size}
    return project_from_dict({"model": model}).model


def plan_for(project: Project, device: str, precision: str, ranks: int, sequences_per_step: int,
             seq_len: int, model: Optional[ModelConfig] = None, resume: Optional[tuple[str, int]] = None) -> Plan:
    """The plan of `project` (or of the same run with another `model`) on `ranks` ranks; `resume`: the
    checkpoint tag it continues from and that checkpoint's step."""
    from ..inspect import inspect_parameters

    model = model or project.model
    seq_len = min(seq_len, model.block_size)
    report = inspect_parameters(model, seq_len=seq_len)
    train = project.train
    steps = train.max_steps
    if train.max_tokens > 0:
        steps = min(steps, math.ceil(train.max_tokens / (sequences_per_step * seq_len)))
    tag, done = resume or (None, 0)
    done = min(done, steps)
    eval_tokens = 0
    if train.eval_every > 0 and steps > done:
        # every eval_every steps, and at the end
        evaluations = steps // train.eval_every - done // train.eval_every + (steps % train.eval_every > 0)
        eval_tokens = evaluations * train.eval_batches * train.micro_batch_size * seq_len * ranks
    return Plan(model_name=model_name(model), parameters=report.total, flops_per_token=report.flops_per_token,
                device=device, precision=precision, zero_stage=project.deepspeed.zero_stage, ranks=ranks,
                sequences_per_step=sequences_per_step, seq_len=seq_len, steps=steps - done, eval_tokens=eval_tokens,
                steps_done=done, resume_tag=tag)


def resume_point(project: Project, resume: str) -> Optional[tuple[str, int]]:
    """The checkpoint `--resume` would continue from, and its step (read from its client state). Quiet: the
    damaged checkpoints passed over are reported once, when the run decides (checkpoint.agree_on_resume)."""
    from . import checkpoint

    if resume == "never":  # a fresh start (over an existing run it is refused later, with the reason)
        return None
    run_dir = project.project.out_dir
    root = checkpoint.checkpoints_dir(run_dir)
    tag = next((tag for tag in checkpoint.resume_candidates(run_dir) if not checkpoint.check_checkpoint(root / tag)),
               None)
    return None if tag is None else (tag, int(checkpoint.read_client_state(run_dir, tag)["step"]))


# --- the rate ---------------------------------------------------------------------------------------------------


def measure_cpu_flops(seconds: float = 0.2, size: int = 1024) -> float:
    """FLOP/s of fp32 square matmuls on this process's threads, timed for about `seconds`."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # the first call pays for thread start-up and allocation
    done, started = 0, time.perf_counter()
    while True:
        a @ b
        done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 2:
            return 2 * size**3 * done / elapsed


def achievable_flops(device: str, precision: str, ranks: int,
                     measure_cpu: Callable[[], float] = measure_cpu_flops) -> Optional[float]:
    """FLOP/s the whole run can be expected to sustain, or None for a GPU with no known peak."""
    if device == "cpu":
        # Each rank measures with its own share of the cores (the CPU launcher splits them).
        return measure_cpu() * CPU_TRAINING_EFFICIENCY * ranks
    from .metrics import peak_flops

    peak = peak_flops(device)
    if peak is None:
        return None
    if precision == "fp32":
        peak *= GPU_FP32_FRACTION
    return peak * GPU_TYPICAL_MFU * ranks


# --- the message ------------------------------------------------------------------------------------------------


def human_count(n: float) -> str:
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:.0f}"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    minutes = seconds / 60
    if minutes < 90:
        return f"about {round(minutes)} minute{'s' if round(minutes) != 1 else ''}"
    hours = minutes / 60
    if hours < 48:
        return f"about {hours:.0f} hours" if hours >= 10 else f"about {hours:.1f} hours"
    return f"about {hours / 24:.0f} days"


def describe(project: Project, plan: Plan, rate: Optional[float],
             small_plans: Optional[dict[str, Plan]] = None) -> list[str]:
    """The lines `gpt train` prints before it starts. `small_plans`: the same run with each of the
    CPU-sized presets, for the advice when this one would take hours on a CPU."""
    where = "the CPU" if plan.device == "cpu" else "GPU" if plan.ranks == 1 else "GPUs"
    ranks = f"{plan.ranks} rank{'s' if plan.ranks != 1 else ''}"
    lines = []
    if project.source is None:
        gpt2_sized = preset_shape("gpt2") == project.model.architecture_dict()
        model = "GPT-2 124M" if gpt2_sized else f"model {plan.model_name}"
        lines.append(f"no run.toml: using the built-in defaults, {model}, data from {project.data.dir}, run dir "
                     f"{project.project.out_dir}; `gpt init --preset nano` writes a project file sized for a laptop.")
    lines.append(f"gpt train: model {plan.model_name}, {plan.parameters:,} parameters ({human_count(plan.parameters)}) "
                 f"on {where}, {plan.precision}, ZeRO stage {plan.zero_stage}, {ranks}")
    resumed = ""
    if plan.resume_tag is not None:
        resumed = f" (steps {plan.steps_done + 1:,}-{plan.steps_done + plan.steps:,}, resuming from {plan.resume_tag})"
    lines.append(f"  {plan.sequences_per_step:,} sequences × {plan.seq_len:,} tokens = {plan.tokens_per_step:,} "
                 f"tokens per step × {plan.steps:,} steps{resumed} = {plan.total_tokens:,} tokens "
                 f"({human_count(plan.total_tokens)})")
    if rate is None:
        lines.append("  estimate: none for this GPU (its peak FLOP/s is unknown); the live ETA follows after a "
                     "few steps")
        return lines
    seconds = plan.total_flops / rate
    source = "measured on this CPU" if plan.device == "cpu" else f"{GPU_TYPICAL_MFU:.0%} of peak"
    lines.append(f"  estimate: {human_duration(seconds)} ({plan.total_flops:.1e} FLOPs at ~{rate / 1e9:,.0f} "
                 f"GFLOP/s, {source}); the live ETA follows after a few steps")
    if plan.device == "cpu" and seconds >= LONG_CPU_RUN_SECONDS:
        lines += long_cpu_run_advice(plan, rate, small_plans or {})
    return lines


def long_cpu_run_advice(plan: Plan, rate: float, small_plans: dict[str, Plan]) -> list[str]:
    """Name the largest CPU-sized preset whose run fits in LONG_CPU_RUN_SECONDS (else the smallest), and
    fewer steps when even that does not fit."""
    smaller = [(name, p) for name, p in small_plans.items() if p.parameters < plan.parameters]
    fitting = [(name, p) for name, p in smaller if p.total_flops / rate < LONG_CPU_RUN_SECONDS]
    lines = ["  That is hours on a CPU."]
    chosen = (fitting or smaller[-1:] or [(None, plan)])[0]
    name, chosen_plan = chosen
    if name is not None:
        lines.append(f"  The {name} preset ({human_count(chosen_plan.parameters)} parameters) would take "
                     f"{human_duration(chosen_plan.total_flops / rate)}: `gpt train --set model.preset={name}`, "
                     f"or `gpt init --preset {name}` for a project file sized for it.")
    if not fitting:
        per_step = chosen_plan.total_flops / chosen_plan.steps / rate
        steps = max(1, int(LONG_CPU_RUN_SECONDS / 4 / per_step))  # a quarter of "too long": minutes
        lines.append(f"  Fewer steps fit too: `--set train.max_steps={steps}` would take "
                     f"{human_duration(steps * per_step)}{f' with {name}' if name else ''}.")
    return lines


def announce(project: Project, device: str, resume: str = "never",
             measure_cpu: Callable[[], float] = measure_cpu_flops, stream=None, start=None) -> None:
    """Rank 0: print the plan of this run and its estimate on stderr. `resume`: --resume
    (auto|required|never), to plan only the steps left after the checkpoint it would resume from; `start`:
    what it continues from (continuation.prepare), said after the plan."""
    from .engine import batch_layout, resolve_precision
    from .trackers import check_trackers

    if os.environ.get("RANK", "0") != "0":
        return
    check_trackers(project)  # each tracker asked for is installed
    precision = resolve_precision(project, device)
    layout = batch_layout(project, int(os.environ.get("WORLD_SIZE", "1")))
    shape = (device, precision, layout.world_size, layout.sequences_per_step, layout.seq_len)
    plan = plan_for(project, *shape, resume=resume_point(project, resume))
    rate = achievable_flops(device, precision, layout.world_size, measure_cpu)
    small_plans = {}
    if device == "cpu":
        small_plans = {name: plan_for(project, *shape, model=preset_model(name, project.model.vocab_size))
                       for name in SMALL_PRESETS}
    from .continuation import describe as continues_from

    lines = describe(project, plan, rate, small_plans) + (continues_from(start) if start is not None else [])
    print("\n".join(lines), file=stream or sys.stderr, flush=True)
