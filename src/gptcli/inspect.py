"""`gpt inspect-params`: parameter counts per component against the reference, FLOPs per token, the
model-state memory each ZeRO stage needs per GPU, and, for the project's run, the planner's memory per GPU,
micro batch and time (the planner's). Counted from the configuration alone (planner/counts.py): nothing
is built, and torch is not imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .config import ModelConfig, Project, apply_overrides, load_project, project_file, project_from_dict
from .errors import GptError
from .planner import PlanAgainstMeasured, RunPlan, flops_per_token, parameter_components, zero_memory_per_gpu
from .presets import PRESETS, Preset, preset_for_shape


@dataclass
class ParameterReport:
    name: str
    total: int
    reference: Optional[int]
    source: Optional[str]
    components: dict[str, int]
    flops_per_token: int
    flops_parameters: int
    seq_len: int
    gpus: int
    memory_per_gpu: dict[str, int]
    n_layer: int
    customised_from: Optional[str] = None  # the preset named in the config, when the shape is no longer its
    plan: Optional[RunPlan] = None  # the project's run: memory per GPU, micro batch, time
    against: Optional[PlanAgainstMeasured] = None  # the plan beside what an earlier run of the project measured

    @property
    def matches(self) -> Optional[bool]:
        return None if self.reference is None else self.total == self.reference

    def to_json(self) -> dict:
        return {"name": self.name, "total": self.total, "reference": self.reference, "matches": self.matches,
                "components": self.components, "flops_per_token": self.flops_per_token,
                "memory_per_gpu": self.memory_per_gpu, "gpus": self.gpus, "seq_len": self.seq_len,
                "flops_parameters": self.flops_parameters, "source": self.source,
                "customised_from": self.customised_from, **({"plan": plan_json(self.plan)} if self.plan else {}),
                **({"measured": measured_json(self.against)} if self.against and self.against.measurement else {})}


def named_preset(config: ModelConfig) -> tuple[Optional[Preset], Optional[str]]:
    """(the preset the config names, when it has that preset's shape; the preset it was customised from,
    when it names one and changed any architecture key of it): presets.preset_for_shape, read the way
    inspect-params names a model. A config that names no preset is custom here, whatever its shape."""
    shape, customised_from = preset_for_shape(config)
    return (shape if shape is not None and shape.name == config.preset else None), customised_from


def reference_for(config: ModelConfig) -> tuple[Optional[int], Optional[str]]:
    """The published count and its source, when the config has the shape of the preset it names."""
    preset, customised_from = named_preset(config)
    if preset is not None:
        return preset.reference, preset.source
    if customised_from is not None:
        return None, f"customised from {customised_from}: no published count"
    return None, None


def inspect_parameters(config: ModelConfig, gpus: int = 1, seq_len: Optional[int] = None,
                       name: Optional[str] = None) -> ParameterReport:
    """The counts of planner.parameter_components (from the configuration: nothing is built)."""
    components = parameter_components(config)
    total = sum(components.values())
    seq_len = seq_len or config.block_size
    non_position = total - components["wpe (position embedding)"]
    preset, customised_from = named_preset(config)
    return ParameterReport(
        name=name or (preset.name if preset else "custom"), total=total,
        reference=preset.reference if preset else None, source=preset.source if preset else None,
        components=components, flops_per_token=flops_per_token(config, seq_len),
        flops_parameters=non_position, seq_len=seq_len, gpus=gpus,
        memory_per_gpu=zero_memory_per_gpu(total, gpus), n_layer=config.n_layer, customised_from=customised_from,
    )


@dataclass
class PresetComparison:
    """Every preset side by side: computed count against the published one."""

    reports: list[ParameterReport]

    def to_json(self) -> dict:
        return {"presets": [report.to_json() for report in self.reports]}


def compare_presets(gpus: int = 1) -> PresetComparison:
    return PresetComparison([inspect_parameters(project_from_dict({"model": {"preset": name}}).model, gpus=gpus)
                             for name in PRESETS])


@dataclass
class PlanRequest:
    """The options of `gpt inspect-params` that plan the project's run, validated in one place: they are
    not project keys, so they are plain options rather than overrides."""

    gpu: Optional[str] = None
    gpu_memory: Optional[str] = None
    micro_batch: Optional[str] = None  # a number or "auto"
    mfu: Optional[float] = None
    precision: Optional[str] = None  # --precision: an override of train.precision, like --set

    def overrides(self) -> list[str]:
        """The options that stand for project keys, as `--set` overrides (checked by the schema)."""
        from .config import option_overrides

        return option_overrides("train", {"precision": self.precision})

    def resolved(self) -> dict:
        """planner.plan_run's keyword arguments for these options; a bad one is one GptError sentence."""
        from .planner import find_gpu, parse_memory

        gpu = find_gpu(self.gpu) if self.gpu else None
        capacity, source = (gpu.memory, f"{gpu.name} (as torch reports it)") if gpu else (None, "")
        if self.gpu_memory is not None:
            capacity, source = parse_memory(self.gpu_memory), "--gpu-memory"
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise GptError(f"--mfu must be a fraction in (0, 1], not {self.mfu:g}.")
        return {"gpu": gpu, "capacity": capacity, "capacity_source": source, "mfu": self.mfu,
                "micro_batch": self.micro_batch_value()}

    def micro_batch_value(self):
        text = self.micro_batch
        if text is None or text == "auto":
            return text
        if not text.isdigit() or int(text) < 1:
            raise GptError(f'--micro-batch must be a whole number of sequences or "auto", not "{text}".')
        return int(text)

    @property
    def given(self) -> bool:
        return any(value is not None for value in (self.gpu, self.gpu_memory, self.micro_batch, self.mfu,
                                                   self.precision))


def plan_device(project: Project) -> str:
    """The device the project's run is planned on: train.device = "cpu" is a CPU run (its ranks, its memory,
    this CPU's speed); "cuda" and "auto" plan a GPU run, what a plan is mostly asked for before one is rented
    (on a machine without CUDA, `gpt train` runs "auto" on the CPU: --set train.device=cpu plans that)."""
    return "cpu" if project.train.device == "cpu" else "cuda"


def plan_for_project(project: Project, gpus: int, options: dict, read_run: bool = True) -> PlanAgainstMeasured:
    """The planner's view of the project's run on `gpus` ranks (options: PlanRequest.resolved()), on the
    device, precision and attention kernel the run will use, beside what an earlier run of it measured
    (`read_run`: the project's run dir is read)."""
    from .planner import plan_against_measured

    if plan_device(project) == "cuda":
        return plan_against_measured(project, read_run, device="cuda", ranks=gpus,
                                     compile_model=project.train.compile is not False, **options)
    if options["gpu"] or options["capacity"] is not None or options["mfu"] is not None:
        raise GptError('--gpu, --gpu-memory and --mfu plan a GPU run, and this project trains on the CPU '
                       '(train.device = "cpu"); leave them out, or --set train.device=cuda.')
    from .machine import available_memory, measure_cpu_flops
    from .planner import gib

    free = available_memory()
    source = "each rank's share of what this machine has free" if gpus > 1 else "what this machine has free"
    return plan_against_measured(project, read_run, device="cpu", ranks=gpus, micro_batch=options["micro_batch"],
                                 capacity=None if free is None else free // gpus,
                                 capacity_source=f"{source} ({gib(free)})" if free else "",
                                 cpu_flops=measure_cpu_flops(), compile_model=project.train.compile is True)


def load_for_plan(preset: Optional[str], project: Optional[Path], keys: list[str], micro_batch) -> Project:
    """PRESET with `keys`, or the project file with them. A step set in tokens must be a multiple of the
    micro batch × seq_len, which loading checks with the project's micro batch; a micro batch asked for
    (--micro-batch N, or one sequence for "auto") stands in for it when the project's does not divide the
    step."""
    def load(extra: list[str]) -> Project:
        if preset is not None:
            return project_from_dict(apply_overrides({"model": {"preset": preset}}, [*keys, *extra]))
        return load_project(project, [*keys, *extra])

    try:
        return load([])
    except GptError:
        if micro_batch is None:
            raise
        return load([f"train.micro_batch_size={1 if micro_batch == 'auto' else micro_batch}"])


def inspect_command(preset: Optional[str], project: Optional[Path], overrides: list[str],
                    gpus: int = 1, request: Optional[PlanRequest] = None) -> Union[ParameterReport, PresetComparison]:
    """`gpt inspect-params`: PRESET (with any --set overrides) when given; else the project's [model]; with
    neither a project file nor overrides, every preset side by side. The report carries the plan of the
    project's run (memory per GPU, micro batch, time) on `gpus` GPUs."""
    request = request or PlanRequest()
    options = request.resolved()  # a bad option is said before anything is imported or built
    keys = [*overrides, *request.overrides()]
    if preset is None and project_file(project) is None and not overrides:
        if request.given:
            raise GptError("--gpu, --gpu-memory, --micro-batch, --mfu and --precision plan one model: name a preset "
                           "(gpt inspect-params gpt2 --gpu H100-80GB) or a project (--project FILE).")
        return compare_presets(gpus)
    config = load_for_plan(preset, project, keys, options["micro_batch"])
    against = plan_for_project(config, gpus, options, read_run=preset is None)
    report = inspect_parameters(config.model, gpus=gpus, seq_len=against.plan.training.seq_len)
    report.plan, report.against = against.plan, against
    return report


def plan_json(plan: RunPlan) -> dict:
    """Everything the plan says, each size in bytes under a name that says what it is."""
    memory = plan.memory
    peak_terms = {term.replace(" ", "_"): size for term, size in memory.peak_phase.terms.items()}
    return {
        "device": plan.training.device, "gpu": plan.gpu.name if plan.gpu else None, "gpus": plan.training.ranks,
        "precision": plan.training.precision, "zero_stage": plan.training.zero_stage,
        "attention_kernel": plan.attention_kernel, "activation_checkpointing": memory.checkpointing,
        "micro_batch": plan.layout.micro_batch_size, "grad_accum_steps": plan.layout.grad_accum_steps,
        "seq_len": plan.layout.seq_len, "tokens_per_step": plan.tokens_per_step,
        "memory": {"peak_phase": memory.peak_phase.phase, **peak_terms, "peak": memory.peak,
                   "allowance": memory.allowance, "required": memory.required, "capacity": plan.capacity,
                   "capacity_source": plan.capacity_source, "fits": plan.fits,
                   "allowances": {name: {"bytes": a.size, "assumed": a.assumed} for name, a in memory.allowances.items()},
                   "activations_kept": memory.activations.kept, "activations_per_layer": memory.activations.per_layer,
                   "phases": {phase.phase: phase.total for phase in memory.phases}},
        "largest_micro_batch": ({"without_checkpointing": plan.largest[False], "with_checkpointing": plan.largest[True]}
                                if plan.largest else None),
        "suggested": ({"micro_batch": plan.suggestion.micro_batch_size,
                       "grad_accum_steps": plan.suggestion.grad_accum_steps} if plan.suggestion else None),
        "time": time_json(plan),
    }


def time_json(plan: RunPlan) -> dict:
    peak = plan.rate / plan.mfu / plan.training.ranks if plan.rate and plan.mfu else None
    return {"mfu": plan.mfu, "rate_source": plan.rate_source or None, "flops_per_s": plan.rate,
            "peak_flops_per_gpu": peak, "flops_per_step": plan.flops_per_token * plan.tokens_per_step,
            "seconds_per_step": plan.step_seconds, "steps": plan.steps, "train_seconds": plan.train_seconds,
            "startup_seconds": plan.startup_seconds}


def measured_json(against: PlanAgainstMeasured) -> dict:
    """What an earlier run of the project measured, and beside the plan's estimate with their ratios (when
    the measurement holds for this plan; else the settings that differ)."""
    from dataclasses import asdict

    assert against.measurement is not None, "called for a measurement"
    return {"run": asdict(against.measurement), "differences": against.differences,
            "comparisons": [row.to_json() for row in against.comparisons]}
