"""Checkpoints: save, resume, retention and consolidation into a model dir.

    RUN/checkpoints/step_00000100/   DeepSpeed's own files (module, ZeRO partitions of the optimizer)
                                     + client_state.json (step, tokens, data cursor, config hash, architecture)
                                     + rng_rank<R>.pt per rank (Python, NumPy, torch, CUDA generator states)
                                     + manifest.json: every file's size and sha256, written last
    RUN/checkpoints/latest           the tag of the newest complete checkpoint

`latest` is replaced (write + rename) by rank 0 only after every rank has finished writing, so it never
names a partial checkpoint; a crash mid-save leaves the previous one in charge. Retention deletes the
oldest complete checkpoints beyond `keep` and never the one `latest` names.

Resuming checks a checkpoint's files against its manifest first: a damaged one (a truncated file, a
deleted optimizer partition) is passed over, with a warning, for the newest intact older one. Rank 0
decides whether and from which checkpoint to resume; every rank follows its decision.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ModelConfig, Project, dump_toml
from ..errors import GptError
from ..fsutil import OWNED_FILES, atomic_path, atomic_write_json, atomic_write_text, read_owned
from .chatter import LOG_FILE as LIBRARY_LOG
from .lock import broadcast_from_rank0
from .metrics import CSV_FILE, METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR

CLIENT_STATE = "client_state.json"
MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
RESOLVED_CONFIG = "config.resolved.toml"
MODEL_DIR = "model"
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies these beside the checkpoints


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def config_hash(project: Project) -> str:
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


def agree_on_resume(run_dir: Path, mode: str, restart: bool, rank: int) -> Optional[str]:
    """The checkpoint tag every rank resumes from (None: start fresh). Rank 0 decides, every rank follows:
    each rank reading the dir on its own could pick different tags while a save or a fallback is under way."""
    decision = {"tag": None, "error": None}
    if rank == 0:
        try:
            decision["tag"] = decide_start(run_dir, mode, restart)
        except GptError as error:
            decision["error"] = str(error)
    decision = broadcast_from_rank0(decision)
    if decision["error"]:
        raise GptError(decision["error"])
    return decision["tag"]


def decide_start(run_dir: Path, mode: str, restart: bool) -> Optional[str]:
    """Rank 0: --restart clears the old run; --resume never refuses to start over an existing one;
    auto|required pick the checkpoint to resume."""
    if restart:
        if mode == "required":
            raise GptError("--restart starts the run over, so it cannot go with --resume required.")
        remove_run_files(run_dir)
        return None
    if mode == "never":
        refuse_existing_run(run_dir)
        return None
    return find_resume(run_dir, mode)


def find_resume(run_dir: Path, mode: str) -> Optional[str]:
    """The newest intact checkpoint (`latest` first, then older complete ones, newest first), warning about
    each damaged one passed over; None when there is none at all (refused under --resume required)."""
    root = checkpoints_dir(run_dir)
    damaged = []
    for tag in resume_candidates(run_dir):
        problems = check_checkpoint(root / tag)
        if not problems:
            for bad_tag, bad_problems in damaged:
                print(f"warning: checkpoint {bad_tag} is damaged ({'; '.join(bad_problems)}); resuming from {tag} "
                      "instead.", file=sys.stderr)
            return tag
        damaged.append((tag, problems))
    if damaged:
        listed = "; ".join(f"{tag}: {', '.join(problems)}" for tag, problems in damaged)
        raise GptError(f"No usable checkpoint in {root}, all are damaged ({listed}); pass --restart to start over "
                       "there, or choose another project.out_dir.")
    if mode == "required":
        raise GptError(f"--resume required, but {root} has no complete checkpoint to resume from.")
    return None


def resume_candidates(run_dir: Path) -> list[str]:
    """The tag `latest` names (even when its dir is gone: that is damage to report), then the complete
    checkpoints older than it, newest first. Ones newer than `latest` are partial saves of a crashed run."""
    root = checkpoints_dir(run_dir)
    latest_path = root / LATEST
    latest = latest_path.read_text(errors="replace").strip() if latest_path.is_file() else None
    complete = complete_checkpoints(root)
    if latest is None:
        return [tag for _, tag in sorted(complete, reverse=True)]
    match = TAG_PATTERN.match(latest)
    limit = int(match.group(1)) if match else float("inf")
    return [latest] + [tag for step, tag in sorted(complete, reverse=True) if step < limit and tag != latest]


def complete_checkpoints(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of each checkpoint dir that was finished: it has a manifest, or, saved before manifests
    existed, a client state."""
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = TAG_PATTERN.match(path.name)
        if match and path.is_dir() and ((path / MANIFEST).is_file() or (path / CLIENT_STATE).is_file()):
            found.append((int(match.group(1)), path.name))
    return found


# --- manifests: what a checkpoint held when it was saved ---------------------------------------------------


def write_manifest(directory: Path) -> None:
    """Record every file's size and sha256; called once all ranks have written theirs, before `latest`."""
    files = checkpoint_files(directory)
    digests = sha256_files(directory, files)
    atomic_write_json(directory / MANIFEST, {"files": {
        name: {"bytes": (directory / name).stat().st_size, "sha256": digests[name]} for name in files}})


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def sha256_files(directory: Path, names: list[str]) -> dict[str, str]:
    """In threads: hashlib releases the GIL while it hashes, so a large checkpoint's files hash in parallel."""
    def digest(name: str) -> str:
        with open(directory / name, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(digest, names)))


def check_checkpoint(directory: Path) -> list[str]:
    """What is wrong with a checkpoint dir against its manifest (sizes first, then hashes); [] if intact."""
    if not directory.is_dir():
        return ["its directory is missing"]
    if not (directory / MANIFEST).is_file():
        # Saved before checkpoints had manifests: complete if the client state (written last) is there.
        return [] if (directory / CLIENT_STATE).is_file() else [f"{CLIENT_STATE} is missing"]
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
        expected = {str(name): (int(meta["bytes"]), str(meta["sha256"])) for name, meta in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, (size, _) in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} when saved")
    if problems:
        return problems
    digests = sha256_files(directory, list(expected))
    return [f"{name} differs from what was saved (sha256)" for name, (_, digest) in expected.items()
            if digests[name] != digest]


# --- starting over -----------------------------------------------------------------------------------------


def run_files(run_dir: Path) -> list[Path]:
    """What `gpt train` wrote into a run dir, and nothing else: checkpoints, metrics, the loss plot, the
    resolved config, the library log, TensorBoard events, the consolidated model."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in (METRICS_FILE, CSV_FILE, PLOT_FILE, RESOLVED_CONFIG, LIBRARY_LOG)
             if (run_dir / name).is_file()]
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if TAG_PATTERN.match(p.name) or p.name in (LATEST, *DEEPSPEED_SCRIPTS)
                        or (p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp")))
    if (run_dir / TENSORBOARD_DIR).is_dir():
        found += sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    if (run_dir / MODEL_DIR).exists():
        found.append(run_dir / MODEL_DIR)
    return found


def holds_run(run_dir: Path) -> bool:
    """A run has been trained here: a checkpoint, logged steps or a consolidated model."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    return (complete_checkpoints(checkpoints_dir(run_dir)) != [] or (checkpoints_dir(run_dir) / LATEST).is_file()
            or (metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / MODEL_DIR).exists())


def refuse_existing_run(run_dir: Path) -> None:
    if holds_run(run_dir):
        raise GptError(f"{run_dir} already holds a run, and --resume never does not delete it: pass --restart to "
                       "start over there (it deletes only what gpt train wrote), or choose another project.out_dir.")


def remove_run_files(run_dir: Path) -> None:
    """--restart: delete what `gpt train` wrote (never a file it did not write), noting what went."""
    run_dir = Path(run_dir)
    check_model_dir_is_ours(run_dir / MODEL_DIR)  # before anything is deleted
    files = run_files(run_dir)
    for path in files:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for directory in (checkpoints_dir(run_dir), run_dir / TENSORBOARD_DIR):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    if files:
        checkpoints = sum(1 for p in files if TAG_PATTERN.match(p.name))
        names = sorted({p.name for p in files if not TAG_PATTERN.match(p.name) and p.parent == run_dir})
        shown = ", ".join([f"{checkpoints} checkpoints"] * bool(checkpoints) + names)
        print(f"note: --restart removed what gpt train wrote in {run_dir}: {shown}.", file=sys.stderr)


def check_model_dir_is_ours(model_dir: Path) -> None:
    if not model_dir.exists():
        return
    owned = read_owned(model_dir) if model_dir.is_dir() else None
    if owned is None:
        raise GptError(f"{model_dir} holds no record of files written by gptcli ({OWNED_FILES}), so --restart does "
                       "not delete it; move it away or choose another project.out_dir.")
    foreign = sorted(p.name for p in model_dir.iterdir() if p.name not in owned)
    if foreign:
        raise GptError(f"{model_dir} holds files gptcli did not write ({', '.join(foreign[:3])}), so --restart does "
                       "not delete it; move them away or choose another project.out_dir.")


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
    dist.barrier()  # every rank's files are on disk before the manifest lists them and `latest` names them
    if rank == 0:
        write_manifest(root / tag)
        atomic_write_text(root / LATEST, tag + "\n")
        prune(root, keep, tag)
    dist.barrier()
    return tag


def prune(root: Path, keep: int, latest: str) -> None:
    """Keep the newest `keep` complete checkpoints up to `latest`, which itself always stays; anything newer
    than `latest`, or never finished, is a partial save of a crashed run and goes too."""
    latest_step = int(TAG_PATTERN.match(latest).group(1))
    complete = sorted((step, tag) for step, tag in complete_checkpoints(root) if step <= latest_step)
    kept = {tag for _, tag in complete[-keep:]} | {latest}
    for path in root.iterdir():
        if TAG_PATTERN.match(path.name) and path.is_dir() and path.name not in kept:
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
    try:
        path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise GptError(f"DeepSpeed could not load checkpoint {root / tag}.")
        restore_rng(torch.load(root / tag / f"rng_rank{dist.get_rank()}.pt", weights_only=False))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # Checked checkpoints do not get here; one saved before manifests existed may.
        raise GptError(f"Cannot load checkpoint {root / tag} ({type(error).__name__}: {error}); pass --restart to "
                       "start over, or move that checkpoint away to resume from an older one.") from None
    return client


def read_client_state(run_dir: Path, tag: str) -> dict:
    path = checkpoints_dir(run_dir) / tag / CLIENT_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GptError(f"Cannot read {path}: {error}.") from None


def check_architecture(client: dict, config: ModelConfig, tag: str) -> None:
    """A checkpoint resumes only into the architecture it was trained with; name the first difference."""
    difference = architecture_difference(client, config)
    if difference:
        raise GptError(f"Cannot resume checkpoint {tag}: {difference} in the checkpoint.")


def architecture_difference(client: dict, config: ModelConfig) -> Optional[str]:
    """The first architecture key that differs between a checkpoint's client state and `config`, in words."""
    saved = client.get("architecture", {})
    current = config.architecture_dict()
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"model.{key} is {current.get(key)!r} in this project but {saved.get(key)!r}"
    return None


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
    atomic_write_text(Path(run_dir) / RESOLVED_CONFIG, dump_toml(project))
