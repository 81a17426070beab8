"""`gpt export-hf`: a gptcli model dir → a Hugging Face dir that AutoModelForCausalLM.from_pretrained and
AutoTokenizer load (config.json, model.safetensors, tokenizer files)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import GptError
from ..fsutil import check_replaceable, follow_umask, output_lock, staged_dir
from .convert import GPT1_ACTIVATIONS, check_finite, hf_name_of, is_transposed
from .source import HFWeights

HF_EXPORT = "Hugging Face export"  # what fsutil's OWNED_FILES record says an export dir is


def export_family(config: ModelConfig) -> str:
    """gpt2 or openai-gpt, or a refusal naming the option that Hugging Face's classes cannot express."""
    fixed = {"position": "learned", "attention": "causal", "bias": True}
    for key, needed in fixed.items():
        if getattr(config, key) != needed:
            raise GptError(f"model.{key} = {json.dumps(getattr(config, key))} has no Hugging Face GPT-2/GPT-1 "
                           f"equivalent (export needs {json.dumps(needed)}).")
    if config.norm_position == "pre" and config.final_norm:
        family = "gpt2"
    elif config.norm_position == "post" and not config.final_norm:
        family = "openai-gpt"
    else:
        raise GptError(f'model.norm_position = "{config.norm_position}" with model.final_norm = '
                       f"{str(config.final_norm).lower()} matches neither GPT-2 (pre, true) nor GPT-1 (post, false).")
    if family == "openai-gpt":
        if config.mlp_ratio != 4:
            raise GptError(f"model.mlp_ratio = {config.mlp_ratio}: Hugging Face's GPT-1 has a fixed MLP width of 4.")
        if config.activation == "gelu":
            raise GptError('model.activation = "gelu" (exact): Hugging Face\'s GPT-1 only has the tanh GELU.')
    return family


def hf_config_for(config: ModelConfig, family: str, tokenizer, dtype: torch.dtype) -> dict:
    common = {"vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
              "n_layer": config.n_layer, "n_head": config.n_head, "layer_norm_epsilon": config.layer_norm_epsilon,
              "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
              "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings,
              "dtype": str(dtype).replace("torch.", "")}
    if family == "openai-gpt":
        afn = {v: k for k, v in GPT1_ACTIVATIONS.items() if k != "swish"}[config.activation]
        return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", **common, "afn": afn}
    eot = tokenizer.eot_id if tokenizer.eot_id is not None and tokenizer.eot_id < config.vocab_size else None
    activation = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[config.activation]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_inner": config.mlp_ratio * config.n_embd, "activation_function": activation,
            "scale_attn_weights": True, "bos_token_id": eot, "eos_token_id": eot}


def export_tensors(model_dir: Path, config: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """The model dir's weights under HF names: Conv1D transposes, GPT-1 renames, no vocabulary padding.
    Checked as `gpt eval` and `gpt load-hf` check them: read through HFWeights (a truncated or damaged
    file is named), every tensor's shape against config.json, every value finite."""
    weights = HFWeights([model_dir / "model.safetensors"])
    check_shapes(weights, config, model_dir)
    tensors = {}
    for name in list(weights.shapes):
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # stored once, as wte.weight; transformers re-ties it on load
        tensor = weights.load(name, transpose=is_transposed(name))  # (out, in) → Conv1D's (in, out)
        check_finite(tensor, name, str(model_dir / "model.safetensors"))
        if name in ("wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]  # (V, C): padding rows (vocab_multiple) are not exported
        tensors[hf_name_of(name, family)] = tensor.contiguous()
    return tensors


def check_shapes(weights: HFWeights, config: ModelConfig, model_dir: Path) -> None:
    """The weights fit config.json, as loading them for eval or generate requires (model_from_state_dict
    on meta tensors: the check without reading or allocating the weights)."""
    from ..model import model_from_state_dict

    meta = {name: torch.empty(shape, device="meta") for name, shape in weights.shapes.items()
            if not (name == "lm_head.weight" and config.tie_embeddings)}
    model_from_state_dict(config, meta, where=f"{model_dir / 'model.safetensors'} (with {model_dir / 'config.json'})")


@dataclass
class ExportReport:
    out: Path
    family: str
    source: str
    tensors: int
    files: list[str]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "out": str(self.out)}


def export_hf(checkpoint: Path | str, out: Path | str, force: bool = False) -> ExportReport:
    """Write a model dir (or a run dir's consolidated model) as a Hugging Face dir that
    AutoModelForCausalLM.from_pretrained and AutoTokenizer load. With `force`, an existing `out` is
    replaced only when gptcli wrote everything in it (a previous export), never a repo clone or the input."""
    from ..modeldir import resolve_model_dir

    out = Path(out)
    model_dir = resolve_model_dir(checkpoint)
    # The check and the write under the output's lock: no other command publishes `out` meanwhile.
    with output_lock(out, "gpt export-hf", lambda: check_replaceable(out, force=force, what=HF_EXPORT, inputs=[model_dir])):
        return export_into(model_dir, out)


def export_into(model_dir: Path, out: Path) -> ExportReport:
    from safetensors.torch import save_file

    from ..modeldir import read_model_config
    from ..tokenizer import load_from_model_dir

    config = read_model_config(model_dir)
    family = export_family(config)
    tokenizer = load_from_model_dir(model_dir)
    with staged_dir(out, "export-hf", HF_EXPORT) as staging:  # from here on, a stop or an error leaves `out` as it was
        tensors = export_tensors(model_dir, config, family)
        dtype = tensors[hf_name_of("wte.weight", family)].dtype
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        follow_umask(staging / "model.safetensors")  # save_file creates it 0600
        hf_config = hf_config_for(config, family, tokenizer, dtype)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        files = ["config.json", "model.safetensors", *tokenizer.save_for_hf(staging, config.block_size)]
    return ExportReport(out=out, family=family, source=str(model_dir), tensors=len(tensors), files=files)
