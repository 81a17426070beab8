"""The model dir: what `gpt load-hf` writes and training consolidates into, and what eval, generate and
export-hf read.

    model.safetensors      weights with GPT-2 names (the tied lm_head is stored once, as wte.weight)
    config.json            the [model] section
    tokenizer.gptcli.json  which tokenizer, its fingerprint, and the vocabulary files beside it

A directory is built in a staging dir beside it and renamed into place (fsutil.staged_dir), so a
half-written model dir never exists under the final name; it replaces only a dir gptcli wrote.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from .config import ConfigError, ModelConfig, UnknownReference, project_from_dict
from .errors import GptError
from .fsutil import check_output, check_replaceable, follow_umask, output_lock, read_owned, staged_dir
from .model import GPT, model_from_state_dict
from .parsing import loads_json
from .rundir import CHECKPOINTS
from .rundir import MODEL_DIR as RUN_MODEL_DIR
from .tokenizer import TOKENIZER_FILE, Tokenizer, load_from_model_dir

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Every name save_model_dir may write: what a model dir from before fsutil's OWNED_FILES list holds.
MODEL_DIR_FILES = {WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, "gpt2.tiktoken", "vocab.json", "merges.txt"}


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


def write_model_files(directory: Path, model: GPT, tokenizer: Tokenizer, metadata: Optional[dict] = None) -> None:
    """Weights, config and tokenizer into `directory` (a staging dir: see save_model_dir)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    info = {"format": "gptcli-model", **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(state_dict_for_saving(model), str(directory / WEIGHTS_FILE), metadata=info)
    follow_umask(directory / WEIGHTS_FILE)  # save_file creates it 0600
    config = dataclasses.asdict(model.config)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(directory)


MODEL_DIR = "model dir"  # what fsutil's OWNED_FILES record says a model dir is


def legacy_model_dir_files(path: Path) -> Optional[set[str]]:
    """MODEL_DIR_FILES for a model dir written before fsutil's OWNED_FILES record existed, else None."""
    path = Path(path)
    legacy = path.is_dir() and not path.is_symlink() and read_owned(path) is None and is_model_dir(path)
    return MODEL_DIR_FILES if legacy else None


def check_model_dir_replaceable(out_dir: Path | str, force: bool, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse, before any work, to write a model dir where it would lose something (fsutil.check_output)."""
    check_replaceable(out_dir, force=force, what=MODEL_DIR, inputs=inputs, owned=legacy_model_dir_files(Path(out_dir)))


def save_model_dir(out_dir: Path | str, model: GPT, tokenizer: Tokenizer, metadata: Optional[dict] = None,
                   instead: str = "choose another output directory", command: str = "gpt train") -> Path:
    """Write model, config and tokenizer to `out_dir`, replacing a model dir gptcli wrote there atomically
    (training consolidates into RUN/model again and again); anything else there is refused, with
    `instead` saying what to do. The check and the write hold the output's lock (fsutil.output_lock)."""
    out_dir = Path(out_dir)

    def check() -> None:
        check_output(out_dir, what=MODEL_DIR, force=True, owned=legacy_model_dir_files(out_dir), flag=None,
                     instead=instead)

    with output_lock(out_dir, command, check), staged_dir(out_dir, "model", MODEL_DIR) as staging:
        write_model_files(staging, model, tokenizer, metadata)
    return out_dir


def read_model_config(path: Path) -> ModelConfig:
    try:
        values = loads_json((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise GptError(f"Cannot read {path / CONFIG_FILE}: {error}.") from None
    try:
        return project_from_dict({"model": values}).model
    except UnknownReference as error:  # e.g. an attention pattern of a plugin not installed here
        raise GptError(f"{path / CONFIG_FILE} names what this Python does not have: {error}") from None
    except ConfigError as error:
        raise GptError(f"{path / CONFIG_FILE} is not a gptcli model config: {error}") from None


def resolve_model_dir(path: Path | str) -> Path:
    """A model dir, or a run dir (then its consolidated `model/`)."""
    path = Path(path)
    if not path.exists():
        raise GptError(f"Checkpoint {path} does not exist.")
    if is_model_dir(path):
        return path
    if is_model_dir(path / RUN_MODEL_DIR):
        return path / RUN_MODEL_DIR
    if (path / CHECKPOINTS).is_dir():
        raise GptError(f"Run dir {path} has no consolidated model yet (it appears in {path / RUN_MODEL_DIR} when "
                       "training ends, or with `gpt train --consolidate`).")
    raise GptError(f"{path} is neither a gptcli model dir (model.safetensors, config.json, {TOKENIZER_FILE}) "
                   "nor a run dir; for Hugging Face weights use `gpt load-hf` first.")


def check_tensor(tensor: torch.Tensor, name: str, where: str) -> None:
    """The one check of a weight gptcli reads (load-hf, export-hf, eval, generate, train.init_from): floating
    point (integer weights train a dead model: every gradient is lost in the cast) and finite (NaN or inf
    gives NaN logits for every input). `where` names the file, and what reads it."""
    if not tensor.is_floating_point():
        raise GptError(f"{where}: {name} is {str(tensor.dtype).replace('torch.', '')}, not floating point; gptcli "
                       "reads only floating-point weights.")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise GptError(f"{where}: {name} holds {bad:,} NaN or infinite values; gptcli does not use non-finite "
                       "weights.")


def check_weights(state: dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in state.items():
        check_tensor(tensor, name, where)


def load_model_dir(path: Path | str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Load a model dir (or a run dir's consolidated model) for inference, in eval mode; its weights checked
    as every reader checks them (check_weights)."""
    from safetensors.torch import load_file

    path = resolve_model_dir(path)
    config = read_model_config(path)
    tokenizer = load_from_model_dir(path)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as error:  # safetensors' own error types: a truncated or foreign file
        raise GptError(f"Cannot read {path / WEIGHTS_FILE}: {error}.") from None
    check_weights(state, str(path / WEIGHTS_FILE))
    model = model_from_state_dict(config, state, device=device, dtype=dtype, where=str(path / WEIGHTS_FILE))
    return LoadedModel(model=model.eval(), config=config, tokenizer=tokenizer, path=path)
