"""Parameters and FLOPs of the GPT model.py builds, counted from its configuration alone: the one count
`gpt inspect-params`, the planner and the live MFU use (tests/test_model.py checks it against the modules)."""

from __future__ import annotations

import math

from ..config import ModelConfig

# --- parameters and FLOPs -----------------------------------------------------------------------------------------


def parameter_tensors(config: ModelConfig) -> dict[str, int]:
    """Every parameter tensor of the GPT that model.py builds, by its state-dict name: elements as held
    (vocabulary padding rows included; the tied lm_head is wte itself, so it is not listed)."""
    return {name: math.prod(shape) for name, shape in parameter_shapes(config).items()}


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each parameter tensor parameter_tensors counts, as torch holds it (a Linear's weight is
    (outputs, inputs)): what an optimizer spec's grouping rule sees."""
    C, hidden, Vp = config.n_embd, config.mlp_ratio * config.n_embd, config.padded_vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (Vp, C)}
    if config.position == "learned":
        shapes["wpe.weight"] = (config.block_size, C)
    linears = (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, hidden), ("mlp.c_proj", hidden, C))
    for layer in range(config.n_layer):
        shapes.update(norm_shapes(f"h.{layer}.ln_1", config))
        for name, inputs, outputs in linears[:2]:
            shapes.update(linear_shapes(f"h.{layer}.{name}", inputs, outputs, config))
        shapes.update(norm_shapes(f"h.{layer}.ln_2", config))
        for name, inputs, outputs in linears[2:]:
            shapes.update(linear_shapes(f"h.{layer}.{name}", inputs, outputs, config))
    if config.final_norm:
        shapes.update(norm_shapes("ln_f", config))
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (Vp, C)
    return shapes


def linear_shapes(prefix: str, inputs: int, outputs: int, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (outputs, inputs), **({f"{prefix}.bias": (outputs,)} if config.bias else {})}


def norm_shapes(prefix: str, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (config.n_embd,), **({f"{prefix}.bias": (config.n_embd,)} if config.bias else {})}


def parameter_components(config: ModelConfig) -> dict[str, int]:
    """The counts `gpt inspect-params` reports (model.parameter_components of the built model, equal by a
    test): vocabulary padding left out, the tied lm_head counted once, as wte."""
    C, L, hidden = config.n_embd, config.n_layer, config.mlp_ratio * config.n_embd
    bias = int(config.bias)
    norm = C * (1 + bias)
    return {
        "wte (token embedding)": config.vocab_size * C,
        "wpe (position embedding)": config.block_size * C if config.position == "learned" else 0,
        "attention (all blocks)": L * (C * 3 * C + 3 * C * bias + C * C + C * bias),
        "mlp (all blocks)": L * (C * hidden + hidden * bias + hidden * C + C * bias),
        "layernorms (all blocks)": L * 2 * norm,
        "ln_f (final norm)": norm if config.final_norm else 0,
        "lm_head": 0 if config.tie_embeddings else config.vocab_size * C,
    }


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls of forward+backward (Kaplan et al. 2020) plus
    12·L·H·D·T for attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). N is every
    parameter but the position embedding (a lookup, not a matmul), the tied wte/lm_head counted once."""
    components = parameter_components(config)
    matmul_parameters = sum(components.values()) - components["wpe (position embedding)"]
    return 6 * matmul_parameters + 12 * config.n_layer * config.n_head * config.head_dim * seq_len
