"""Hugging Face GPT-2 / GPT-1 → gptcli: config.json → [model], the key map, the transposes.

The key map is short because gptcli keeps GPT-2's names (model.py):
  - a leading `transformer.` is dropped (GPT2LMHeadModel nests the body under it); `lm_head.weight` is
    top level and, when embeddings are tied, absent or equal to `wte.weight`;
  - GPT-1 only: `tokens_embed.weight` ↔ `wte.weight`, `positions_embed.weight` ↔ `wpe.weight`;
  - HF's Conv1D stores (in, out), nn.Linear (out, in): the four TRANSPOSED weights are transposed;
  - the causal-mask buffers `h.N.attn.bias` and `h.N.attn.masked_bias` are not weights and are skipped,
    matched exactly (a looser "ends with attn.bias" rule also drops `attn.c_attn.bias`, and the model
    then generates "model model model ...").
Everything else must match name and shape exactly, be floating point and finite; every fault is named in
one error. Nothing is ever left randomly initialised (model.model_from_state_dict).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, project_from_dict
from ..errors import GptError
from ..presets import preset_for_shape
from .source import HFSource, HFWeights

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT1_RENAMES = {"tokens_embed.weight": "wte.weight", "positions_embed.weight": "wpe.weight"}
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # matched against the whole name
BODY_PREFIX = "transformer."

# HF activation names → gptcli's. GPT-2 names them as transformers' ACT2FN does; GPT-1's `afn`
# "gelu" is the tanh approximation (modeling_openai's ACT_FNS maps it to gelu_new).
GPT2_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu",
                    "silu": "silu", "swish": "silu"}
GPT1_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


# --- config.json → [model] ------------------------------------------------------------------------------


def model_config_from_hf(hf: dict, family: str) -> ModelConfig:
    """The gptcli ModelConfig of a HF config.json; options gptcli's model cannot express are refused."""
    n_embd = hf.get("n_embd", 768)
    if family == "openai-gpt":
        activation, activations, mlp_ratio = hf.get("afn", "gelu"), GPT1_ACTIVATIONS, 4  # fixed 4*nx in HF
        layout = {"norm_position": "post", "final_norm": False, "vocab_size": hf.get("vocab_size", 40478),
                  "block_size": hf.get("n_positions", 512)}
    else:
        activation, activations = hf.get("activation_function", "gelu_new"), GPT2_ACTIVATIONS
        n_inner = hf.get("n_inner") or 4 * n_embd
        if n_inner % n_embd:
            raise GptError(f"config.json n_inner = {n_inner} is not a multiple of n_embd = {n_embd}; gptcli's "
                           "MLP width is a whole multiple (model.mlp_ratio).")
        mlp_ratio = n_inner // n_embd
        layout = {"norm_position": "pre", "final_norm": True, "vocab_size": hf.get("vocab_size", 50257),
                  "block_size": hf.get("n_positions", 1024)}
        refuse_gpt2_options(hf)
    if activation not in activations:
        raise GptError(f'config.json activation "{activation}" has no gptcli equivalent '
                       f"(supported: {', '.join(activations)}).")
    values = {**layout, "n_layer": hf.get("n_layer", 12), "n_head": hf.get("n_head", 12), "n_embd": n_embd,
              "mlp_ratio": mlp_ratio, "activation": activations[activation], "bias": True, "position": "learned",
              "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
              "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
              "dropout": float(hf.get("resid_pdrop", 0.1))}
    try:
        config = project_from_dict({"model": values}).model
    except ConfigError as error:
        raise GptError(f"config.json does not describe a model gptcli can build: {error}") from None
    shape, _ = preset_for_shape(config)  # named, so that the count is checked against its reference
    return dataclasses.replace(config, preset=shape.name if shape else None)


def refuse_gpt2_options(hf: dict) -> None:
    unsupported = {"scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
                   "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
                   "add_cross_attention": (False, hf.get("add_cross_attention", False))}
    for key, (supported, value) in unsupported.items():
        if value != supported:
            raise GptError(f"config.json sets {key} = {json.dumps(value)}, which gptcli's GPT-2 does not "
                           f"implement (it needs {json.dumps(supported)}).")


# --- tensors → model ------------------------------------------------------------------------------------------


def gptcli_name(hf_name: str, family: str, prefix: str) -> Optional[str]:
    """The gptcli name of a HF tensor, or None for a mask buffer (not a weight)."""
    name = hf_name[len(prefix):] if prefix and hf_name.startswith(prefix) else hf_name
    if MASK_BUFFER.fullmatch(name):
        return None
    if family == "openai-gpt":
        name = GPT1_RENAMES.get(name, name)
    return name


def is_transposed(name: str) -> bool:
    return any(name.endswith("." + suffix) for suffix in TRANSPOSED)


def hf_shape(name: str, shape: tuple) -> tuple:
    return tuple(reversed(shape)) if is_transposed(name) else tuple(shape)


def plan_conversion(weights: HFWeights, model_shapes: dict[str, tuple], family: str, where: str) -> dict[str, str]:
    """gptcli name → HF name for every weight, after checking names, shapes and dtypes; one error lists
    all faults."""
    prefix = BODY_PREFIX if any(n.startswith(BODY_PREFIX) for n in weights.shapes) else ""
    plan, seen, unexpected, wrong, not_float = {}, set(), [], [], []
    for hf_name, shape in weights.shapes.items():
        name = gptcli_name(hf_name, family, prefix)
        if name is None or (family == "openai-gpt" and name == "position_ids"):  # buffers, not weights
            continue
        seen.add(name)
        if name not in model_shapes:
            unexpected.append(hf_name)
        elif hf_shape(name, model_shapes[name]) != shape:
            wrong.append(f"{hf_name} {list(shape)} (expected {list(hf_shape(name, model_shapes[name]))})")
        elif not weights.dtypes[hf_name].is_floating_point:
            not_float.append(f"{hf_name} ({str(weights.dtypes[hf_name]).replace('torch.', '')})")
        else:
            plan[name] = hf_name
    missing = [hf_name_of(n, family, prefix) for n in model_shapes if n not in seen and n != "lm_head.weight"]
    faults = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
              ("not floating point", not_float))
    if any(items for _, items in faults):
        parts = [f"{label}: {listing(items)}" for label, items in faults if items]
        raise GptError(f"{where} does not fit its config.json ({family}): {'; '.join(parts)}.")
    return plan


def listing(items: list[str], most: int = 12) -> str:
    shown = ", ".join(items[:most])
    return shown if len(items) <= most else f"{shown} and {len(items) - most} more"


def hf_name_of(name: str, family: str, prefix: str = BODY_PREFIX) -> str:
    """The HF name of a gptcli weight (the inverse of gptcli_name)."""
    if name == "lm_head.weight":
        return name
    if family == "openai-gpt":
        name = {v: k for k, v in GPT1_RENAMES.items()}.get(name, name)
    return prefix + name


def convert_weights(source: HFSource, config: ModelConfig):
    """The gptcli model holding every tensor of the HF files, converted (renamed, transposed) and checked."""
    from ..model import build_model, model_from_state_dict

    model_shapes = {name: tuple(t.shape) for name, t in build_model(config, device="meta").state_dict().items()}
    weights = HFWeights(source.weights)
    where = str(source.weights[0]) if len(source.weights) == 1 else f"the weights in {source.directory}"
    plan = plan_conversion(weights, model_shapes, source.family, where)
    state = {}
    for name, hf_name in plan.items():
        state[name] = weights.load(hf_name, transpose=is_transposed(name))  # Conv1D (in, out) → (out, in)
        check_finite(state[name], hf_name, where)
    check_head(state, config, where)
    return model_from_state_dict(config, state, where=where).eval()


def check_finite(tensor: torch.Tensor, hf_name: str, where: str) -> None:
    """NaN or inf weights give NaN logits for every input; refuse them, naming the first such tensor (the one
    weight check every reader makes: modeldir.check_tensor)."""
    from ..modeldir import check_tensor

    check_tensor(tensor, hf_name, where)


def check_head(state: dict, config: ModelConfig, where: str) -> None:
    head = state.pop("lm_head.weight", None)
    if not config.tie_embeddings:
        if head is None:
            raise GptError(f"{where} has no lm_head.weight, and config.json unties it from the embedding "
                           "(tie_word_embeddings = false).")
        state["lm_head.weight"] = head
    elif head is not None and not torch.equal(head, state["wte.weight"]):
        raise GptError(f"{where} has an lm_head.weight that differs from the token embedding, but config.json "
                       "ties them (tie_word_embeddings = true).")

