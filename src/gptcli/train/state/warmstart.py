"""`[train] init_from`: a run that starts from trained weights instead of a random init.

The source is a model dir (what `gpt load-hf` writes, or a run's `model/`), a run dir (then its
consolidated `model/`), or a name `gpt load-hf` fetches from the Hugging Face Hub (GPT-2's family and
GPT-1). Its config gives the run's [model] (continuation.resolve_model checks it against the project);
its weights go into the model before DeepSpeed starts, so every ZeRO stage partitions them as it would
a random init, and under bf16/fp16 the fp32 master copies are then set to the exact fp32 weights
(DeepSpeed makes them from the module's low-precision copy). The optimizer and the schedule start
fresh, at step 0.

The sha256 of the weights file identifies the source: it is printed before training, recorded in the
checkpoints, config.resolved.toml (`init_from_sha256`) and the consolidated model dir, and checked when
the project sets `init_from_sha256`. A resumed run reads its own checkpoints, never the source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ...config import ModelConfig
from ...errors import GptError
from ...modeldir import check_weights
from ...presets import hub_ids

if TYPE_CHECKING:
    from ...hf.source import HFSource
    from ...model import GPT


@dataclass
class WeightsSource:
    """Where init_from's weights are, what they are, and what they are tokenized with."""

    name: str  # init_from as the project gives it
    location: str  # the model dir it resolved to (absolute), or the Hub name
    files: list[Path]  # the weights file(s) read (a model dir's model.safetensors, or the Hub's)
    config: ModelConfig
    tokenizer_fingerprint: str
    tokenizer_name: str
    hf: Optional["HFSource"] = None  # a Hub download, converted when its weights are read
    sha256: Optional[str] = None

    @property
    def path(self) -> Path:
        return self.files[0]


def find_source(init_from: str, run_dir: Optional[Path] = None) -> WeightsSource:
    """The source init_from names: a path when one exists there, else a Hub name `gpt load-hf` knows. A path
    inside `run_dir` (the run's own out_dir) is refused: see check_outside_run_dir."""
    from ...modeldir import WEIGHTS_FILE, read_model_config, resolve_model_dir
    from ...tokenizer import load_from_model_dir

    path = Path(init_from).expanduser()
    if path.exists():
        model_dir = resolve_model_dir(path).absolute()  # a model dir, or a run dir's model/
        if run_dir is not None:
            check_outside_run_dir(init_from, model_dir, run_dir)
        tokenizer = load_from_model_dir(model_dir)
        return WeightsSource(init_from, str(model_dir), [model_dir / WEIGHTS_FILE], read_model_config(model_dir),
                             tokenizer.fingerprint, tokenizer.name)
    if init_from in hub_ids():
        return hub_source(init_from)
    raise GptError(f'train.init_from "{init_from}" is neither a path that exists nor a model gpt load-hf fetches '
                   f"({', '.join(hub_ids())}).")


def check_outside_run_dir(init_from: str, model_dir: Path, run_dir: Path) -> None:
    """The weights a run starts from must outlive it: a source inside the run's own dir is replaced when the
    run ends (RUN/model) and deleted by --restart, after which config.resolved.toml and the checkpoints
    would name a sha256 of bytes that no longer exist."""
    source, run = model_dir.resolve(), Path(run_dir).resolve()
    if source == run or run in source.parents:
        raise GptError(f'train.init_from "{init_from}" lies inside the run dir {run_dir} (project.out_dir), which the '
                       "run replaces (its model/ when it ends, everything with --restart), so the weights it started "
                       "from would be gone; copy them out first (cp -r, or gpt load-hf into another dir) and point "
                       "train.init_from there.")


def hub_source(name: str) -> WeightsSource:
    """A GPT-2 family name: the Hub's files, from the local cache or downloaded (as `gpt load-hf NAME`)."""
    from ...hf.convert import model_config_from_hf
    from ...hf.load import source_tokenizer
    from ...hf.source import resolve_source

    try:
        hf = resolve_source(name)
    except GptError:
        raise GptError(f'train.init_from "{name}": its weights are not in the local Hugging Face cache and could not '
                       f"be downloaded; where there is network run `gpt load-hf {name} --out models/{name}`, then set "
                       f'train.init_from = "models/{name}".') from None
    config = model_config_from_hf(hf.config, hf.family)
    tokenizer, _ = source_tokenizer(hf, config.vocab_size)
    return WeightsSource(name, name, [p.absolute() for p in hf.weights], config, tokenizer.fingerprint,
                         tokenizer.name, hf=hf)


def weights_sha256(files: list[Path]) -> str:
    """sha256 of the weights file (of the files one after the other, for a sharded Hub checkpoint)."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def check_sha256(source: WeightsSource, expected: Optional[str]) -> None:
    if expected is not None and expected.lower() != source.sha256:
        raise GptError(f"train.init_from {source.name} ({source.path}) has sha256 {source.sha256}, but "
                       f"train.init_from_sha256 is {expected}: the weights changed since it was recorded.")


# --- the weights into the model -----------------------------------------------------------------------------


def read_weights(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The source's tensors in fp32 with gptcli's names (the tied lm_head left out)."""
    if source.hf is not None:
        from ...hf.convert import convert_weights

        state = convert_weights(source.hf, source.config).state_dict()
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(source.path))
        except Exception as error:  # safetensors' own error types: a truncated or foreign file
            raise GptError(f"Cannot read {source.path}: {error}.") from None
        check_weights(state, f"train.init_from {source.name} ({source.path})")  # as load-hf, eval, export-hf do
    if source.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.float() for name, tensor in state.items()}


def fit_vocabulary_rows(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The embedding (and an untied head) with the rows `config` trains: its vocab_size real rows, then
    zero padding rows up to padded_vocab_size (a GPU pads GPT-2's 50,257 to 50,304; training never looks up
    or predicts a padding row, and consolidation drops them again)."""
    fitted = dict(state)
    for name in ("wte.weight", "lm_head.weight"):
        if name in fitted and fitted[name].size(0) != config.padded_vocab_size:
            rows = torch.zeros(config.padded_vocab_size, fitted[name].size(1), dtype=fitted[name].dtype)
            rows[: config.vocab_size] = fitted[name][: config.vocab_size]
            fitted[name] = rows
    return fitted


def model_from_source(source: WeightsSource, config: ModelConfig) -> tuple[GPT, dict[str, torch.Tensor]]:
    """The model `config` describes (the training config: padded for a GPU) holding the source's weights in
    fp32, and those weights by name (for set_fp32_masters)."""
    from ...model import model_from_state_dict

    state = fit_vocabulary_rows(read_weights(source), config)
    model = model_from_state_dict(config, state, where=f"train.init_from {source.name} ({source.path})")
    return model, state


@torch.no_grad()
def set_fp32_masters(engine, state: dict[str, torch.Tensor]) -> None:
    """Under bf16/fp16 DeepSpeed made the fp32 masters from the module's low-precision copy, which lost the
    low bits of the source's weights; copy the exact fp32 values in. The module keeps its copy (the same
    rounding of the same values). In fp32 the masters already are the source's values."""
    from deepspeed.utils import safe_set_full_fp32_param

    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return
    stage0 = dict(stage0_master_pairs(engine.optimizer))
    for name, param in engine.module.named_parameters():
        value = state[name].to(param.device)
        if id(param) in stage0:
            stage0[id(param)].copy_(value.view_as(stage0[id(param)]))
        else:
            safe_set_full_fp32_param(param, value)  # ZeRO 1-3 and BF16_Optimizer: each rank its own part


def stage0_master_pairs(optimizer) -> list[tuple[int, torch.Tensor]]:
    """ZeRO-0 under bf16/fp16: (id of the module's parameter, its fp32 master) from DeepSpeed's FP16
    optimizers, which keep the masters per group as a list (unfused) or one flat tensor (fused, in the
    group's order, no padding). Empty for any other optimizer."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    pairs = []
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            pairs += [(id(p), master) for p, master in zip(group, masters, strict=True)]
    elif isinstance(optimizer, FP16_Optimizer):
        for group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True):
            offset = 0
            for p in group:
                pairs.append((id(p), flat.narrow(0, offset, p.numel()).view(p.shape)))
                offset += p.numel()
    return pairs
