"""Checkpoints: save, resume, retention and consolidation into a model dir.

    RUN/checkpoints/step_00000100/   DeepSpeed's own files (module, ZeRO partitions of the optimizer)
                                     + client_state.json (step, tokens, data cursor, config hash, architecture)
                                     + rng_rank<R>.pt per rank (Python, NumPy, torch, CUDA generator states)
    RUN/checkpoints/latest           the tag of the newest complete checkpoint

`latest` is replaced (write + rename) by rank 0 only after every rank has finished writing, so it never
names a partial checkpoint; a crash mid-save leaves the previous one in charge. Retention deletes the
oldest complete checkpoints beyond `keep` and never the one `latest` names.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ModelConfig, Project, dump_toml
from ..errors import GptError
from ..fsutil import atomic_path, atomic_write_json, atomic_write_text

CLIENT_STATE = "client_state.json"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def config_hash(project: Project) -> str:
    import hashlib

    return hashlib.sha256(dump_toml(project).encode()).hexdigest()[:16]


def read_latest(run_dir: Path) -> Optional[str]:
    """The tag `latest` names, when it names a checkpoint whose client state exists."""
    path = checkpoints_dir(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (checkpoints_dir(run_dir) / tag / CLIENT_STATE).is_file():
        raise GptError(f"{path} names checkpoint {tag!r}, which is missing or incomplete.")
    return tag


def find_resume(run_dir: Path, mode: str) -> Optional[str]:
    """The checkpoint tag to resume from under --resume auto|required|never."""
    if mode == "never":
        return None
    tag = read_latest(run_dir)
    if tag is None and mode == "required":
        raise GptError(f"--resume required, but {checkpoints_dir(run_dir)} has no complete checkpoint to resume from.")
    return tag


# --- random generators -----------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load ----------------------------------------------------------------------------------------------


def save(engine, run_dir: Path, step: int, client_state: dict, keep: int, fault=None) -> str:
    """Every rank calls this. Returns the tag; `latest` names it once all ranks are done."""
    import deepspeed.comm as dist

    rank = dist.get_rank()
    root, tag = checkpoints_dir(run_dir), tag_for(step)
    if rank == 0 and (root / tag).exists():
        shutil.rmtree(root / tag)  # a partial save of the same step by a run that crashed
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    with atomic_path(root / tag / f"rng_rank{rank}.pt") as tmp:
        torch.save(rng_state(), tmp)
    if fault is not None:
        fault.maybe_crash_in_save(step)
    if rank == 0:
        atomic_write_json(root / tag / CLIENT_STATE, client_state)
    dist.barrier()  # every rank's files are on disk before `latest` may name them
    if rank == 0:
        atomic_write_text(root / LATEST, tag + "\n")
        prune(root, keep, tag)
    dist.barrier()
    return tag


def prune(root: Path, keep: int, latest: str) -> None:
    """Keep the newest `keep` complete checkpoints up to `latest`; anything newer than `latest` is a
    partial save of a crashed run and goes too."""
    latest_step = int(TAG_PATTERN.match(latest).group(1))
    complete, partial = [], []
    for path in root.iterdir():
        match = TAG_PATTERN.match(path.name)
        if not match or not path.is_dir():
            continue
        step = int(match.group(1))
        if step > latest_step or not (path / CLIENT_STATE).is_file():
            partial.append(path)
        else:
            complete.append((step, path))
    complete.sort()
    doomed = [path for _, path in complete[:-keep]] + partial
    for path in doomed:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, run_dir: Path, tag: str) -> dict:
    """Load DeepSpeed's state and this rank's RNG states; returns the client state."""
    import deepspeed.comm as dist

    root = checkpoints_dir(run_dir)
    client = read_client_state(run_dir, tag)
    world = dist.get_world_size()
    if client.get("world_size", world) != world:
        raise GptError(f"Checkpoint {tag} was written by {client['world_size']} ranks and this run has {world}; "
                       "resume with the same number of ranks (exact resume needs the same data split).")
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise GptError(f"DeepSpeed could not load checkpoint {root / tag}.")
    restore_rng(torch.load(root / tag / f"rng_rank{dist.get_rank()}.pt", weights_only=False))
    return client


def read_client_state(run_dir: Path, tag: str) -> dict:
    path = checkpoints_dir(run_dir) / tag / CLIENT_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GptError(f"Cannot read {path}: {error}.") from None


def check_architecture(client: dict, config: ModelConfig, tag: str) -> None:
    """A checkpoint resumes only into the architecture it was trained with; name the first difference."""
    saved = client.get("architecture", {})
    current = config.architecture_dict()
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise GptError(f"Cannot resume checkpoint {tag}: model.{key} is {current.get(key)!r} in this project "
                           f"but {saved.get(key)!r} in the checkpoint.")


# --- consolidation ----------------------------------------------------------------------------------------------


def full_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint, read offline, whatever the precision and ZeRO stage.

    Under bf16/fp16 the module's own weights are low-precision copies; the masters live with the optimizer:
    - ZeRO 1-3: the optimizer partitions `zero_pp_rank_*` (`bf16_zero_pp_rank_*` under bf16), merged by
      deepspeed.utils.zero_to_fp32; bf16 ZeRO-1 with fp32 gradient accumulation is DeepSpeed's
      BF16_Optimizer, whose partitions that merge does not read (no zero_stage key), so they are merged here;
    - ZeRO 0: `mp_rank_00_model_states.pt`, whose optimizer state holds the fp16/bf16 optimizer's masters;
      in fp32 the module's weights are the masters.
    """
    directory = checkpoints_dir(run_dir) / tag
    partitions = sorted(directory.glob("*zero_pp_rank_*_optim_states.pt"), key=partition_rank)
    if not partitions:
        state = stage0_masters(directory)
    elif "zero_stage" in torch.load(partitions[0], map_location="cpu", mmap=True, weights_only=False)[
            "optimizer_state_dict"]:
        state = zero_masters(directory)
    else:
        state = bf16_optimizer_masters(directory, partitions)
    return {name: tensor.float() for name, tensor in state.items()}


def partition_rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def zero_masters(directory: Path) -> dict[str, torch.Tensor]:
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # the merge narrates every file it reads; keep the run's output readable
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)


def stage0_masters(directory: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0: fp32 keeps no separate masters. DeepSpeed's fp16/bf16 optimizers keep them per parameter
    group (a list per group, or one flat tensor per group when fused) but save no names for them at
    stage 0, so the run records its groups' parameter names in the client state."""
    saved = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optimizer = saved.get("optimizer") or {}
    groups = optimizer.get("fp32_groups", optimizer.get("fp32_groups_flat"))
    if groups is None:
        return saved["module"]
    names = json.loads((directory / CLIENT_STATE).read_text()).get("parameter_groups")
    if names is None:
        raise GptError(f"Checkpoint {directory} does not name its optimizer's parameters (it predates "
                       "parameter_groups in client_state.json), so its fp32 weights cannot be consolidated.")
    module = saved["module"]
    masters = {}
    for group_names, group in zip(names, groups):
        shapes = {name: module[name].shape for name in group_names}
        tensors = split_flat(group, shapes) if isinstance(group, torch.Tensor) else group
        masters.update({name: tensor.view(shapes[name]) for name, tensor in zip(group_names, tensors)})
    return with_shared(masters, saved)


def bf16_optimizer_masters(directory: Path, partitions: list[Path]) -> dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer: per parameter group, rank r holds slice r of one flat fp32 vector
    (the parameters in `param_shapes` order, zero-padded at the end to split evenly)."""
    saved = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    slices = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              ["single_partition_of_fp32_groups"] for path in partitions]
    masters = {}
    for index, shapes in enumerate(saved["param_shapes"]):
        flat = torch.cat([rank_slices[index] for rank_slices in slices])
        masters.update(zip(shapes, split_flat(flat, shapes)))
    return with_shared(masters, saved)


def split_flat(flat: torch.Tensor, shapes: dict) -> list[torch.Tensor]:
    """Consecutive views of `flat` shaped as `shapes` (what follows them is alignment padding)."""
    needed = sum(math.prod(shape) for shape in shapes.values())
    if needed > flat.numel():
        raise GptError(f"The optimizer's fp32 weights ({flat.numel():,} values) do not fit the model's "
                       f"parameters ({needed:,}); the checkpoint is damaged.")
    tensors, offset = [], 0
    for shape in shapes.values():
        count = math.prod(shape)
        tensors.append(flat[offset: offset + count].view(shape))
        offset += count
    return tensors


def with_shared(masters: dict[str, torch.Tensor], saved: dict) -> dict[str, torch.Tensor]:
    """Add the tied parameters DeepSpeed saved once (`shared_params`: alias → source) and the buffers."""
    for alias, source in (saved.get("shared_params") or {}).items():
        if source in masters:
            masters[alias] = masters[source]
    for name in saved.get("buffer_names") or []:
        masters.setdefault(name, saved["module"][name])
    return masters


def consolidate(run_dir: Path, tag: str, config: ModelConfig, tokenizer, out_dir: Optional[Path] = None) -> Path:
    """Write RUN/model (or `out_dir`): the checkpoint's full weights as a model dir."""
    from ..model import model_from_state_dict
    from ..modeldir import save_model_dir

    state = full_state_dict(run_dir, tag)
    for name in ("wte.weight", "lm_head.weight"):
        if name in state and state[name].size(0) > config.padded_vocab_size:
            # Trained with more padding rows than `config` has (a GPT-2 preset on a GPU pads to a multiple
            # of 128); those rows are never looked up or predicted, so dropping them changes nothing.
            state[name] = state[name][: config.padded_vocab_size]
    model = model_from_state_dict(config, state, where=f"Checkpoint {tag}")
    client = json.loads((checkpoints_dir(run_dir) / tag / CLIENT_STATE).read_text())
    metadata = {"step": client["step"], "tokens": client["tokens"], "checkpoint": tag}
    return save_model_dir(out_dir or Path(run_dir) / "model", model, tokenizer, metadata)


def write_resolved_config(run_dir: Path, project: Project) -> None:
    atomic_write_text(Path(run_dir) / "config.resolved.toml", dump_toml(project))


def remove_latest(run_dir: Path) -> None:
    """--resume never: the old `latest` must not send a later `--resume auto` back into the old run."""
    path = checkpoints_dir(run_dir) / LATEST
    if path.is_file():
        os.unlink(path)
