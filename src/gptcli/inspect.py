"""`gpt inspect-params`: parameter counts per component against the reference, FLOPs per token, and the
model-state memory each ZeRO stage needs per GPU. Built on the meta device: no weights are allocated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import ModelConfig
from .model import build_model, parameter_components
from .presets import PRESETS

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

    @property
    def matches(self) -> Optional[bool]:
        return None if self.reference is None else self.total == self.reference

    def to_json(self) -> dict:
        return {"name": self.name, "total": self.total, "reference": self.reference, "matches": self.matches,
                "components": self.components, "flops_per_token": self.flops_per_token,
                "memory_per_gpu": self.memory_per_gpu, "gpus": self.gpus, "seq_len": self.seq_len,
                "flops_parameters": self.flops_parameters, "source": self.source}


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


def reference_for(config: ModelConfig) -> tuple[Optional[int], Optional[str]]:
    """The preset's published count, if the config still has the preset's architecture."""
    preset = PRESETS.get(config.preset or "")
    if preset is None:
        return None, None
    if any(getattr(config, key) != value for key, value in preset.model.items()):
        return None, f"customised from {preset.name}: no published count"
    return preset.reference, preset.source


def inspect_parameters(config: ModelConfig, gpus: int = 1, seq_len: Optional[int] = None,
                       name: Optional[str] = None) -> ParameterReport:
    model = build_model(config, device="meta")
    components = parameter_components(model)
    total = sum(components.values())
    seq_len = seq_len or config.block_size
    non_position = total - components["wpe (position embedding)"]
    reference, source = reference_for(config)
    return ParameterReport(
        name=name or config.preset or "custom", total=total, reference=reference, source=source,
        components=components, flops_per_token=flops_per_token(config, non_position, seq_len),
        flops_parameters=non_position, seq_len=seq_len, gpus=gpus,
        memory_per_gpu=zero_memory_per_gpu(total, gpus), n_layer=config.n_layer,
    )
