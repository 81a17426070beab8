"""The plan in words: the lines `gpt inspect-params` and `gpt train`'s pre-flight print."""

from __future__ import annotations

from ..optimizers import ADAMW, OptimizerSpec
from .gpus import GiB
from .plan import RunPlan

# --- in words -----------------------------------------------------------------------------------------------------


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


def gib(size: float) -> str:
    """A size in GiB, or MiB below one GiB."""
    return f"{size / GiB:,.1f} GiB" if size >= GiB else f"{size / 2**20:.0f} MiB"


def model_state_title(gpus: int, optimizer: OptimizerSpec = ADAMW) -> str:
    """The title of inspect-params' table of textbook model-state memory (states.zero_memory_per_gpu)."""
    return f"model-state memory per GPU, mixed-precision {optimizer.shown}, {gpus} GPU(s)"


def memory_line(plan: RunPlan) -> str:
    """Peak memory per GPU (per rank on a CPU) by its largest terms, the allowances, and the capacity when
    there is one."""
    terms = sorted(plan.memory.peak_phase.terms.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{term} {gib(size)}" for term, size in terms[:4])
    per = "GPU" if plan.training.device == "cuda" else "rank"
    line = (f"memory per {per}: {gib(plan.memory.peak)} at the peak ({shown}) + {gib(plan.memory.allowance)} "
            f"allowance = {gib(plan.memory.required)}")
    if plan.capacity is not None:
        line += f" of {gib(plan.capacity)} {plan.capacity_source}: {'fits' if plan.fits else 'does not fit'}"
    return line


def allowance_line(plan: RunPlan) -> str:
    """What the allowance is made of, each marked as an assumption or a measurement."""
    parts = [f"{name} {gib(allowance.size)} ({'assumed' if allowance.assumed else 'measured'})"
             for name, allowance in plan.memory.allowances.items()]
    return f"allowance: {', '.join(parts) or 'none'}"


def where_line(plan: RunPlan) -> str:
    training = plan.training
    if training.device == "cpu":
        return f"{training.ranks} CPU rank(s)"
    return f"{training.ranks} × {plan.gpu.name}" if plan.gpu else f"{training.ranks} GPU(s)"


def time_line(plan: RunPlan) -> str:
    train_seconds, rate = plan.train_seconds, plan.rate  # None without a rate of FLOP/s
    if train_seconds is None or rate is None:
        if plan.training.device == "cpu":
            return "time: no estimate (this CPU's speed was not measured)"
        return "time: give --gpu NAME (or [train] peak_tflops) for an estimate"
    if plan.mfu is not None:
        speed = f"at {plan.mfu:.0%} MFU ({plan.rate_source})"
    else:
        speed = f"at {rate / 1e9:,.0f} GFLOP/s ({plan.rate_source})"
    return (f"time: {plan.step_seconds:.3g} s per step {speed}; {plan.steps:,} steps "
            f"{human_duration(train_seconds)} + start-up {human_duration(plan.startup_seconds)}")


def plan_summary(plan: RunPlan) -> list[str]:
    """The plan's batch, allowances, micro batches that fit, and time, as `gpt inspect-params` prints them."""
    training, layout = plan.training, plan.layout
    units = "GPU(s)" if training.device == "cuda" else "rank(s)"
    lines = [f"plan: {where_line(plan)}, {training.precision}, {training.optimizer.shown}, ZeRO stage "
             f"{training.zero_stage}{', activation checkpointing' if plan.memory.checkpointing else ''}; micro batch "
             f"{layout.micro_batch_size} × {layout.grad_accum_steps} accumulation × {training.ranks} {units} × "
             f"{layout.seq_len:,} tokens = {plan.tokens_per_step:,} tokens per step", allowance_line(plan)]
    if plan.largest:
        lines.append(f"largest micro batch that fits: {plan.largest[False]} (with activation checkpointing: "
                     f"{plan.largest[True]})")
    if plan.suggestion is not None:
        per_rank = layout.micro_batch_size * layout.grad_accum_steps
        lines.append(f"for the {per_rank} sequences per {units[:-3]} of a step: micro batch "
                     f"{plan.suggestion.micro_batch_size} × {plan.suggestion.grad_accum_steps} accumulation")
    return lines + [time_line(plan)]
