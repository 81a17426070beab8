"""`gpt inspect-params`: parameter counts per component against the reference, FLOPs per token, and the
model-state memory each ZeRO stage needs per GPU. Built on the meta device: no weights are allocated."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .config import ModelConfig, apply_overrides, load_project, project_file, project_from_dict
from .presets import PRESETS, Preset

# Mixed-precision Adam keeps 16 bytes per parameter (Rajbhandari et al. 2020, ZeRO, section 3.1):
# 2 (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master weights, momentum, variance).
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12


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

    @property
    def matches(self) -> Optional[bool]:
        return None if self.reference is None else self.total == self.reference

    def to_json(self) -> dict:
        return {"name": self.name, "total": self.total, "reference": self.reference, "matches": self.matches,
                "components": self.components, "flops_per_token": self.flops_per_token,
                "memory_per_gpu": self.memory_per_gpu, "gpus": self.gpus, "seq_len": self.seq_len,
                "flops_parameters": self.flops_parameters, "source": self.source,
                "customised_from": self.customised_from}


def flops_per_token(config: ModelConfig, non_position_params: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls of forward+backward (Kaplan et al. 2020) plus
    12·L·H·Q·T for attention scores and values (PaLM, Chowdhery et al. 2022, appendix B).
    N excludes the position embedding (a lookup, not a matmul); the tied wte/lm_head is counted once."""
    return 6 * non_position_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def zero_memory_per_gpu(parameters: int, gpus: int) -> dict[str, int]:
    """Model-state bytes per GPU for ZeRO stages 0-3 across `gpus` data-parallel ranks."""
    p, g = parameters, gpus
    return {
        "zero0": p * (WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES),
        "zero1": p * (WEIGHT_BYTES + GRAD_BYTES) + p * OPTIMIZER_BYTES // g,
        "zero2": p * WEIGHT_BYTES + p * (GRAD_BYTES + OPTIMIZER_BYTES) // g,
        "zero3": p * (WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) // g,
    }


def preset_shape(config: ModelConfig) -> tuple[Optional[Preset], Optional[str]]:
    """(the preset whose shape this is, the preset it was customised from): a config that names a preset
    but changes any architecture key of it (mlp_ratio included, though the preset does not list it) is
    no longer that preset, and has no published count."""
    preset = PRESETS.get(config.preset or "")
    if preset is None:
        return None, None
    if project_from_dict({"model": {"preset": preset.name}}).model.architecture_dict() != config.architecture_dict():
        return None, preset.name
    return preset, None


def reference_for(config: ModelConfig) -> tuple[Optional[int], Optional[str]]:
    """The published count and its source, when the config has the shape of the preset it names."""
    preset, customised_from = preset_shape(config)
    if preset is not None:
        return preset.reference, preset.source
    if customised_from is not None:
        return None, f"customised from {customised_from}: no published count"
    return None, None


# The torch.nn.init functions that module constructors and GPT.reset_parameters call.
INIT_FUNCTIONS = ("uniform_", "normal_", "kaiming_uniform_", "ones_", "zeros_", "trunc_normal_")


@contextmanager
def initialisation_skipped():
    """Within the block, torch.nn.init leaves tensors as they are. A meta model has no values to
    initialise, and the init functions' meta kernels import torch._dynamo on first use: about a second,
    most of what `inspect-params gpt2-xl` would take after torch's own import."""
    import torch.nn.init

    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def inspect_parameters(config: ModelConfig, gpus: int = 1, seq_len: Optional[int] = None,
                       name: Optional[str] = None) -> ParameterReport:
    from .model import build_model, parameter_components

    with initialisation_skipped():
        model = build_model(config, device="meta")
    components = parameter_components(model)
    total = sum(components.values())
    seq_len = seq_len or config.block_size
    non_position = total - components["wpe (position embedding)"]
    preset, customised_from = preset_shape(config)
    return ParameterReport(
        name=name or (preset.name if preset else "custom"), total=total,
        reference=preset.reference if preset else None, source=preset.source if preset else None,
        components=components, flops_per_token=flops_per_token(config, non_position, seq_len),
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


def inspect_command(preset: Optional[str], project: Optional[Path], overrides: list[str],
                    gpus: int = 1) -> Union[ParameterReport, PresetComparison]:
    """`gpt inspect-params`: PRESET (with any --set overrides) when given; else the project's [model]; with
    neither a project file nor overrides, every preset side by side."""
    if preset is not None:
        config = project_from_dict(apply_overrides({"model": {"preset": preset}}, overrides))
    elif project_file(project) is None and not overrides:
        return compare_presets(gpus)
    else:
        config = load_project(project, overrides)
    return inspect_parameters(config.model, gpus=gpus)
