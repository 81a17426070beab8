"""What a run measured of itself (RUN/measured.json, written by `gpt train`): its peak memory per rank and its
speed, with the settings they were measured at; and the plan of the same run beside it, term by term, with
their ratio. `gpt inspect-params --project P` shows the comparison, and the planner plans a later run of the
project at the speed measured (plan.run_rate)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..config import Project
from ..fsutil import atomic_write_json
from ..rundir import MEASURED_FILE
from .gpus import gpu_for_device_name
from .plan import FRAGMENTATION, RunPlan, plan_run

# The settings a measurement holds for: a plan with other values is another run, and is not compared.
SETTINGS = ("device", "ranks", "precision", "zero_stage", "micro_batch", "grad_accum_steps", "seq_len",
            "activation_checkpointing", "model_fingerprint")


@dataclass
class Measurement:
    """A run's own figures. Memory per rank, the largest over the ranks: on CUDA torch's
    max_memory_allocated and max_memory_reserved; on the CPU the peak resident set (VmHWM). Speed: the
    median over the optimizer steps logged (the first left out: it pays for warm-up and compilation)."""

    device: str  # "cuda" or "cpu"
    ranks: int
    precision: str
    zero_stage: int
    micro_batch: int
    grad_accum_steps: int
    seq_len: int
    activation_checkpointing: bool
    model_fingerprint: str
    steps: int  # the optimizer steps the speed is the median of
    tokens_per_s: Optional[float]  # the whole run's
    flops_per_token: int
    device_name: str = ""  # torch.cuda.get_device_name(), or "cpu"
    mfu: Optional[float] = None  # against the peak of the precision run (GPU)
    peak_allocated: Optional[int] = None  # bytes, CUDA
    peak_reserved: Optional[int] = None  # bytes, CUDA
    peak_rss: Optional[int] = None  # bytes, CPU

    @property
    def flops_per_rank(self) -> Optional[float]:
        """FLOP/s one rank sustained: what the planner plans a later run of the project at."""
        if not self.tokens_per_s:
            return None
        return self.flops_per_token * self.tokens_per_s / self.ranks

    @property
    def step_seconds(self) -> Optional[float]:
        if not self.tokens_per_s:
            return None
        return self.micro_batch * self.grad_accum_steps * self.ranks * self.seq_len / self.tokens_per_s


def write_measurement(run_dir: Path, measurement: Measurement) -> None:
    atomic_write_json(Path(run_dir) / MEASURED_FILE, asdict(measurement))


def read_measurement(run_dir: Path) -> Optional[Measurement]:
    """The run dir's measurement, or None (no run yet, or a file this version does not read)."""
    path = Path(run_dir) / MEASURED_FILE
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(Measurement)}
        return Measurement(**{key: value for key, value in data.items() if key in known})
    except (OSError, ValueError, TypeError):
        return None


def plan_settings(plan: RunPlan, model_fingerprint: str) -> dict:
    """The plan's values of SETTINGS."""
    training, layout = plan.training, plan.layout
    return {"device": training.device, "ranks": training.ranks, "precision": training.precision,
            "zero_stage": training.zero_stage, "micro_batch": layout.micro_batch_size,
            "grad_accum_steps": layout.grad_accum_steps, "seq_len": layout.seq_len,
            "activation_checkpointing": plan.memory.checkpointing, "model_fingerprint": model_fingerprint}


def differences(plan: RunPlan, model_fingerprint: str, measurement: Measurement) -> list[str]:
    """The settings in which the measured run differs from the plan ("micro_batch 8, planned 4")."""
    planned = plan_settings(plan, model_fingerprint)
    return [f"{key} {getattr(measurement, key)}, planned {planned[key]}" if key != "model_fingerprint"
            else "another model" for key in SETTINGS if getattr(measurement, key) != planned[key]]


@dataclass
class Comparison:
    """One figure, planned and measured."""

    what: str
    planned: Optional[float]
    measured: Optional[float]
    unit: str  # "bytes" or "seconds"

    @property
    def ratio(self) -> Optional[float]:
        """measured / planned."""
        if not self.planned or self.measured is None:
            return None
        return self.measured / self.planned

    def to_json(self) -> dict:
        return {"what": self.what, "planned": self.planned, "measured": self.measured, "unit": self.unit,
                "ratio": self.ratio}


def compare(plan: RunPlan, measurement: Measurement) -> list[Comparison]:
    """The plan's figures beside the run's: on CUDA the tensors at the peak against max_memory_allocated and
    those plus fragmentation against max_memory_reserved; on the CPU the tensors plus the process against the
    peak resident set; and the seconds per step (the plan's own estimate, not the measured speed)."""
    memory = plan.memory
    rows = []
    if measurement.device == "cuda":
        rows.append(Comparison("tensors at the peak (max_memory_allocated)", memory.peak,
                               measurement.peak_allocated, "bytes"))
        rows.append(Comparison("reserved by the allocator (max_memory_reserved)", memory.peak * (1 + FRAGMENTATION),
                               measurement.peak_reserved, "bytes"))
    else:
        rows.append(Comparison("peak resident memory per rank (VmHWM)", memory.required, measurement.peak_rss,
                               "bytes"))
    rows.append(Comparison("seconds per step", plan.step_seconds, measurement.step_seconds, "seconds"))
    return rows


@dataclass
class PlanAgainstMeasured:
    """The plan of a project's run, and what an earlier run of the same project measured."""

    plan: RunPlan  # at the measured speed when the measurement holds for this plan
    estimate: RunPlan  # the planner's own figures, whatever was measured
    measurement: Optional[Measurement] = None
    differences: list[str] = field(default_factory=list)  # why the measurement does not hold for the plan

    @property
    def comparisons(self) -> list[Comparison]:
        if self.measurement is None or self.differences:
            return []
        return compare(self.estimate, self.measurement)


def gpu_differences(plan: RunPlan, measurement: Measurement) -> list[str]:
    if measurement.device != "cuda" or plan.gpu is None:
        return []
    measured_on = gpu_for_device_name(measurement.device_name)
    return [] if measured_on == plan.gpu else [f"measured on {measurement.device_name}, planned for {plan.gpu.name}"]


def plan_against_measured(project: Project, read_run: bool = True, **options) -> PlanAgainstMeasured:
    """plan_run(project, **options); then, when the project's run dir holds a measurement of this same run
    (device, GPU, ranks, precision, batch layout, model), the plan again at the speed it measured.
    `read_run` False: the planner's figures alone (a preset named on the command line has no run dir)."""
    estimate = plan_run(project, **options)
    measurement = read_measurement(Path(project.project.out_dir)) if read_run else None
    if measurement is None:
        return PlanAgainstMeasured(estimate, estimate)
    fingerprint = (options.get("model") or project.model).fingerprint()
    found = differences(estimate, fingerprint, measurement) + gpu_differences(estimate, measurement)
    if found or not measurement.flops_per_rank or options.get("mfu") is not None:
        return PlanAgainstMeasured(estimate, estimate, measurement, found)
    plan = plan_run(project, **options, measured_flops=measurement.flops_per_rank)
    return PlanAgainstMeasured(plan, estimate, measurement)
