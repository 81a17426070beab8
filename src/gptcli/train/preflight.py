"""What `gpt train` checks and says before anything slow starts (DeepSpeed's import, a first-run op build,
the engine, torch.compile): everything knowable from the project, the run dir and the data, each problem
one sentence that names the change that fixes it, then the plan and its estimate.

The arithmetic (memory per GPU, micro batches that fit, FLOPs and time) is the planner's (planner.py,
which `gpt inspect-params` also asks): pre-flight asks it once and prints what it returns. The estimate is
the run's FLOP count over a rate this machine can sustain: the speed an earlier run of the same project
measured (RUN/measured.json); else on a CPU a short matmul timed here, on a GPU its data-sheet peak at the
run's precision times the MFU of its generation and the model's size; plus start-up. It is meant to tell minutes from days before anything
is spent; the live ETA takes over after a few steps. Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import Project
from ..errors import GptError
from ..machine import measure_cpu_flops
from ..planner import (
    CPU_TRAINING_EFFICIENCY,
    Gpu,
    RunPlan,
    allowance_line,
    fitting_change,
    gib,
    human_count,
    human_duration,
    memory_line,
    optimizer_split,
    plan_against_measured,
    preset_model,
)
from ..presets import preset_for_shape
from ..rundir import MODEL_DIR

# A run estimated at more than this on a CPU gets the advice to start smaller.
LONG_CPU_RUN_SECONDS = 3600.0
# The CPU-sized presets, largest first: the first one whose run fits is the one named.
SMALL_PRESETS = ("tiny", "nano")

__all__ = ["Preflight", "preflight", "describe", "measure_cpu_flops", "resume_point", "human_duration",
           "human_count", "CPU_TRAINING_EFFICIENCY"]


@dataclass
class Preflight:
    """What pre-flight found: the plan, and whether there is anything to train."""

    plan: RunPlan
    finished: Optional[str] = None  # why there is nothing to train (the run already finished), else None


# --- checks: each raises one sentence naming the fix --------------------------------------------------------------

def resume_point(project: Project, resume: str) -> Optional[tuple[str, dict]]:
    """The checkpoint `--resume` would continue from, and its client state (step, tokens, architecture).
    Quiet: the damaged checkpoints passed over are reported once, when the run decides
    (checkpoint.agree_on_resume)."""
    from .state import checkpoint

    if resume == "never":  # a fresh start (over an existing run it is refused later, with the reason)
        return None
    run_dir = Path(project.project.out_dir)
    root = checkpoint.checkpoints_dir(run_dir)
    tag = next((tag for tag in checkpoint.resume_candidates(run_dir) if not checkpoint.check_checkpoint(root / tag)),
               None)
    return None if tag is None else (tag, checkpoint.read_client_state(run_dir, tag))


def check_same_model(project: Project, point: Optional[tuple[str, dict]]) -> None:
    """A run dir whose checkpoint holds another architecture (the project's preset or shape changed)."""
    from .state.checkpoint import architecture_difference

    if point is None:
        return
    tag, client = point
    difference = architecture_difference(client, project.model)
    if difference:
        raise GptError(f"{project.project.out_dir} holds a run of another model ({difference} in checkpoint {tag}): "
                       "pass --restart to train this model there from scratch (it deletes that run's files), or "
                       "set another project.out_dir to keep it.")


def finished_message(project: Project, point: Optional[tuple[str, dict]]) -> Optional[str]:
    """When the checkpoint to resume from already reached max_steps or max_tokens: what to do instead."""
    if point is None:
        return None
    tag, client = point
    train, step, tokens = project.train, int(client.get("step", 0)), int(client.get("tokens", 0))
    if step >= train.max_steps:
        reached, further = f"step {step:,} of train.max_steps = {train.max_steps:,}", \
            f"raise train.max_steps (e.g. --set train.max_steps={2 * max(step, 1)})"
    elif train.max_tokens and tokens >= train.max_tokens:
        reached, further = f"{tokens:,} tokens of train.max_tokens = {train.max_tokens:,}", \
            f"raise train.max_tokens (e.g. --set train.max_tokens={2 * tokens})"
    else:
        return None
    run_dir = Path(project.project.out_dir)
    model = "" if (run_dir / MODEL_DIR).is_dir() else "; `gpt train --consolidate` writes its model dir"
    return (f"{run_dir} has finished: checkpoint {tag} is at {reached}, so there is nothing to train{model}. "
            f"To train further, {further}; to start over, --restart.")


def check_data(project: Project, plan: RunPlan, point: Optional[tuple[str, dict]] = None) -> list[str]:
    """The data source against the batch and the run: a train split smaller than one step's micro batch is
    refused (for a mixture: a source without one window, one the run would repeat more than data.max_epochs
    times, a checkpoint `point` saved with another mixture unless data.allow_mixture_change); a val split
    smaller than one evaluation batch is evaluated on what there is. Returns the lines to print: notes, and
    for a mixture its table."""
    from ..data.source import open_source

    source, layout = open_source(project.data), plan.layout
    source.check_train_batch(layout)
    saved, notes = None, []
    if point is not None and "loader" in point[1]:
        saved, note = source.resume_state(point[1]["loader"], int(point[1]["step"]), layout.seq_len)
        notes += [note] if note else []
    lines = source.run_lines(layout, plan.steps, saved, plan.steps_done)
    if not project.train.eval_every:
        return notes + lines
    for part in source.evaluated_parts().values():
        notes += val_notes(part, layout)
    return notes + lines


def val_notes(source, layout) -> list[str]:
    """What evaluation will do with a val split smaller than one evaluation batch (nothing to say without
    val shards: the loop says so)."""
    if source.tokens("val") == 0:
        return []
    batch, micro = source.evaluation_batch(layout), layout.micro_batch_size
    if batch == micro:
        return []
    have = f'the "val" split of {source.description} holds {source.tokens("val"):,} tokens'
    if batch == 0:
        return [f"note: {have}, less than one sequence of {layout.seq_len + 1} tokens per rank: evaluation is off "
                "(a larger data.val_fraction in `gpt prepare`, or a smaller train.seq_len, turns it on)."]
    return [f"note: {have}: evaluation runs micro batches of {batch} sequences, not {micro} (a larger "
            "data.val_fraction in `gpt prepare` gives it more)."]


# --- the plan -----------------------------------------------------------------------------------------------------


@dataclass
class Machine:
    """What this process can see of where it runs: the device, its memory and speed, the ranks."""

    device: str
    ranks: int
    precision: str
    free_memory: Optional[int] = None  # bytes free on this rank's GPU
    device_label: str = ""
    gpu: Optional[Gpu] = None  # the table's entry for this rank's GPU (its peaks, its CUDA context)
    peak_flops: Optional[float] = None  # a 16-bit peak given instead of the table's
    cpu_flops: Optional[float] = None
    op_build_pending: bool = False


def this_machine(project: Project, device: str, measure_cpu: Callable[[], float]) -> Machine:
    from .engine import resolve_precision
    from .launching.opbuild import op_is_built

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    machine = Machine(device, ranks, resolve_precision(project, device))
    if device == "cpu":
        # Rank 0 speaks for all; each rank has its own share of the cores (the CPU launcher splits them).
        machine.cpu_flops = measure_cpu() if os.environ.get("RANK", "0") == "0" else None
        machine.op_build_pending = op_is_built() is False
        return machine
    import torch

    from ..planner import gpu_for_device_name

    index = int(os.environ.get("LOCAL_RANK", "0"))
    machine.free_memory = torch.cuda.mem_get_info(index)[0]
    machine.device_label = f"free on cuda:{index} ({torch.cuda.get_device_name(index)})"
    machine.gpu = gpu_for_device_name(torch.cuda.get_device_name(index))
    return machine


def plan_on(project: Project, machine: Machine, resume: Optional[tuple[str, dict]], **kwargs) -> RunPlan:
    """The plan of this run on this machine, at the speed an earlier run of the project measured when there
    is one for the same settings (planner.plan_against_measured)."""
    from .engine import compile_enabled

    return plan_against_measured(
        project, device=machine.device, ranks=machine.ranks, precision=machine.precision, gpu=machine.gpu,
        capacity=machine.free_memory, capacity_source=machine.device_label, peak_flops=machine.peak_flops,
        cpu_flops=machine.cpu_flops, resume=(resume[0], int(resume[1]["step"])) if resume else None,
        op_build_pending=machine.op_build_pending, compile_model=compile_enabled(project, machine.device),
        context_counted=True, **kwargs).plan


def check_optimizer(project: Project, plan: RunPlan) -> None:
    """A setting the optimizer cannot train in: its spec's own sentence (OptimizerSpec.unsupported; Muon's
    gradient clipping where DeepSpeed would clip its updates instead)."""
    training = plan.training
    refusal = training.optimizer.unsupported(project.train, training.placement)
    if refusal:
        raise GptError(refusal)


def check_memory(project: Project, plan: RunPlan) -> None:
    """Refuse a run whose plan does not fit its capacity (a GPU's free memory; on the CPU a rank's share of
    what this machine has free, train.command.check_fits), naming the change that would."""
    if plan.capacity is None or plan.fits or not project.train.memory_check:
        return
    terms = sorted(plan.memory.peak_phase.terms.items(), key=lambda item: -item[1])[:2]
    largest = " and ".join(f"{term} {gib(size)}" for term, size in terms)
    per = "per GPU" if plan.training.device == "cuda" else "per rank"
    raise GptError(f"This run needs about {gib(plan.memory.required)} {per} ({largest} at micro batch "
                   f"{plan.layout.micro_batch_size}) but {gib(plan.capacity)} is {plan.capacity_source}: "
                   f"{fitting_change(project, plan)} would fit; or --set train.memory_check=false to start anyway.")


def preflight(project: Project, device: str, resume: str = "never", *, overfit: bool = False,
              measure_cpu: Callable[[], float] = measure_cpu_flops, stream=None,
              machine: Optional[Machine] = None, start=None) -> Preflight:
    """Every rank, before anything slow: the checks (each raises one GptError sentence), then rank 0 prints
    the plan and its estimate. `resume`: --resume (auto|required|never), so that the plan counts only the
    steps left after the checkpoint it would resume from; `start`: what the run continues from
    (continuation.prepare, which already found that checkpoint and read its client state), said after the
    plan. Returns the plan, and whether the run is done."""
    from ..tasks.data import check_local
    from .observing.trackers import check_trackers

    check_trackers(project)  # each tracker asked for is installed
    for name in project.eval.tasks:  # [eval] tasks' local files (Hub data is reached when the run reads it)
        if name in project.eval.task_data and not overfit:
            check_local(project.eval.task_data[name])
    if start is not None:
        point = (start.tag, start.client) if start.tag is not None else None
    else:
        point = None if overfit else resume_point(project, resume)
    check_same_model(project, point)
    machine = machine or this_machine(project, device, measure_cpu)
    plan = plan_on(project, machine, point)
    check_optimizer(project, plan)
    finished = finished_message(project, point)
    notes = [] if finished else check_data(project, plan, point)
    if not finished:
        check_memory(project, plan)
    if os.environ.get("RANK", "0") == "0":
        small_plans = {}
        if device == "cpu":
            small_plans = {name: plan_on(project, machine, point, model=preset_model(name, project.model.vocab_size))
                           for name in SMALL_PRESETS}
        origin = continues_from(start) if start is not None else []
        lines = [finished] if finished else [*notes, *describe(project, plan, small_plans), *origin]
        print("\n".join(lines), file=stream or sys.stderr, flush=True)
    return Preflight(plan=plan, finished=finished)


# --- the message --------------------------------------------------------------------------------------------------


def continues_from(start) -> list[str]:
    from .state.continuation import describe as describe_start

    return describe_start(start)


def origin_line(plan: RunPlan) -> str:
    """The steps a resumed run still runs, as part of the tokens line (continues_from says the rest)."""
    if plan.resume_tag is None:
        return ""
    return f" (steps {plan.steps_done + 1:,}-{plan.steps_done + plan.steps:,}, resuming from {plan.resume_tag})"


def describe(project: Project, plan: RunPlan, small_plans: Optional[dict[str, RunPlan]] = None) -> list[str]:
    """The lines `gpt train` prints before it starts. `small_plans`: the same run with each of the
    CPU-sized presets, for the advice when this one would take hours on a CPU."""
    training = plan.training
    where = "the CPU" if training.device == "cpu" else "GPU" if training.ranks == 1 else "GPUs"
    ranks = f"{training.ranks} rank{'s' if training.ranks != 1 else ''}"
    lines = []
    if project.source is None:
        shape, _ = preset_for_shape(project.model)
        model = "GPT-2 124M" if shape is not None and shape.name == "gpt2" else f"model {plan.model_name}"
        lines.append(f"no run.toml: using the built-in defaults, {model}, data from {', '.join(project.data.directories)}, run dir "
                     f"{project.project.out_dir}; `gpt init --preset nano` writes a project file sized for a laptop.")
    lines.append(f"gpt train: model {plan.model_name}, {plan.parameters:,} parameters ({human_count(plan.parameters)}) "
                 f"on {where}, {training.precision}, ZeRO stage {training.zero_stage}, {ranks}")
    lines.append(f"  {plan.layout.sequences_per_step:,} sequences × {plan.layout.seq_len:,} tokens = "
                 f"{plan.tokens_per_step:,} tokens per step × {plan.steps:,} steps{origin_line(plan)} = "
                 f"{plan.total_tokens:,} tokens ({human_count(plan.total_tokens)})")
    lines += [f"  {memory_line(plan)}", f"  {allowance_line(plan)}"]
    split = optimizer_split(training)
    if split:
        lines.append(f"  {split}")
    return lines + estimate_lines(plan, small_plans or {})


def estimate_lines(plan: RunPlan, small_plans: dict[str, RunPlan]) -> list[str]:
    train_seconds = plan.train_seconds  # None without a rate
    if plan.rate is None or train_seconds is None:
        return ["  estimate: none for this GPU (its peak FLOP/s is unknown; [train] peak_tflops sets it); the live "
                "ETA follows after a few steps"]
    startup = ", ".join(f"{term} ~{seconds:.0f} s" for term, seconds in plan.startup.items())
    lines = [f"  estimate: {human_duration(train_seconds + plan.startup_seconds)} ({plan.total_flops:.1e} FLOPs "
             f"at ~{plan.rate / 1e9:,.0f} GFLOP/s, {speed_source(plan)}; start-up: {startup}); the live ETA follows "
             "after a few steps"]
    if plan.training.device == "cpu" and train_seconds >= LONG_CPU_RUN_SECONDS:
        lines += long_cpu_run_advice(plan, small_plans)
    return lines


def speed_source(plan: RunPlan) -> str:
    """Where the rate comes from, with the MFU it stands for on a GPU."""
    return f"{plan.mfu:.0%} MFU: {plan.rate_source}" if plan.mfu is not None else plan.rate_source


def cpu_seconds(plan: RunPlan) -> float:
    """The training time of a plan on this CPU, known: its rate is the FLOP/s measured here."""
    assert plan.train_seconds is not None, plan.model_name
    return plan.train_seconds


def long_cpu_run_advice(plan: RunPlan, small_plans: dict[str, RunPlan]) -> list[str]:
    """Name the largest CPU-sized preset whose run fits in LONG_CPU_RUN_SECONDS (else the smallest), and
    fewer steps when even that does not fit."""
    smaller: list[tuple[Optional[str], RunPlan]] = [
        (name, p) for name, p in small_plans.items() if p.parameters < plan.parameters]
    fitting = [(name, p) for name, p in smaller if cpu_seconds(p) < LONG_CPU_RUN_SECONDS]
    lines = ["  That is hours on a CPU."]
    name, chosen = (fitting or smaller[-1:] or [(None, plan)])[0]
    if name is not None:
        lines.append(f"  The {name} preset ({human_count(chosen.parameters)} parameters) would take "
                     f"{human_duration(cpu_seconds(chosen))}: `gpt train --set model.preset={name}`, "
                     f"or `gpt init --preset {name}` for a project file sized for it.")
    if not fitting:
        per_step = cpu_seconds(chosen) / max(chosen.steps, 1)
        steps = max(1, int(LONG_CPU_RUN_SECONDS / 4 / per_step))  # a quarter of "too long": minutes
        lines.append(f"  Fewer steps fit too: `--set train.max_steps={steps}` would take "
                     f"{human_duration(steps * per_step)}{f' with {name}' if name else ''}.")
    return lines
