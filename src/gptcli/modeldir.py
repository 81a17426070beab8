"""The model dir: what `gpt load-hf` writes and training consolidates into, and what eval, generate and
export-hf read.

    model.safetensors      weights with GPT-2 names (the tied lm_head is stored once, as wte.weight)
    config.json            the [model] section
    tokenizer.gptcli.json  which tokenizer, its fingerprint, and the vocabulary files beside it

A directory is written under a temporary name and renamed into place, so a half-written model dir never
exists under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, ModelConfig, project_from_dict
from .errors import GptError
from .fsutil import publish_dir
from .model import GPT, build_model
from .tokenizer import TOKENIZER_FILE, Tokenizer, load_from_model_dir

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class LoadedModel:
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def is_model_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file() and (path / TOKENIZER_FILE).is_file()


def state_dict_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with the tied lm_head left out (safetensors refuses shared storage)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_model_dir(out_dir: Path | str, model: GPT, tokenizer: Tokenizer, metadata: Optional[dict] = None) -> Path:
    """Write model, config and tokenizer to `out_dir`, replacing an existing model dir there atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        info = {"format": "gptcli-model", **{k: str(v) for k, v in (metadata or {}).items()}}
        save_file(state_dict_for_saving(model), str(staging / WEIGHTS_FILE), metadata=info)
        config = dataclasses.asdict(model.config)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished `staging` dir onto `target`, which may only be a model dir or empty."""
    if target.exists() and not is_model_dir(target) and any(target.iterdir()):
        raise GptError(f"{target} exists and is not a gptcli model dir; refusing to replace it.")
    publish_dir(staging, target)


def read_model_config(path: Path) -> ModelConfig:
    try:
        values = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise GptError(f"Cannot read {path / CONFIG_FILE}: {error}.") from None
    try:
        return project_from_dict({"model": values}).model
    except ConfigError as error:
        raise GptError(f"{path / CONFIG_FILE} is not a gptcli model config: {error}") from None


def resolve_model_dir(path: Path | str) -> Path:
    """A model dir, or a run dir (then its consolidated `model/`)."""
    path = Path(path)
    if not path.exists():
        raise GptError(f"Checkpoint {path} does not exist.")
    if is_model_dir(path):
        return path
    if is_model_dir(path / "model"):
        return path / "model"
    if (path / "checkpoints").is_dir():
        raise GptError(f"Run dir {path} has no consolidated model yet (it appears in {path / 'model'} when "
                       "training ends, or with `gpt train --consolidate`).")
    raise GptError(f"{path} is neither a gptcli model dir (model.safetensors, config.json, {TOKENIZER_FILE}) "
                   "nor a run dir; for Hugging Face weights use `gpt load-hf` first.")


def load_model_dir(path: Path | str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Load a model dir (or a run dir's consolidated model) for inference, in eval mode."""
    from safetensors.torch import load_file

    path = resolve_model_dir(path)
    config = read_model_config(path)
    tokenizer = load_from_model_dir(path)
    model = build_model(config, device="meta")
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as error:
        raise GptError(f"Cannot read {path / WEIGHTS_FILE}: {error}.") from None
    if config.tie_embeddings:
        state["lm_head.weight"] = state.get("wte.weight")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if state[k] is not None and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise GptError(f"{path / WEIGHTS_FILE} does not fit its config: missing {missing or 'none'}, "
                       f"unexpected {unexpected or 'none'}, wrong shape {wrong or 'none'}.")
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return LoadedModel(model=model.eval(), config=config, tokenizer=tokenizer, path=path)
