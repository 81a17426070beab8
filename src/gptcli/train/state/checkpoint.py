"""Checkpoints: save, manifests, resume, retention (reading a checkpoint's weights back is consolidation.py).

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
import pickle
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ...config import ModelConfig, Project, dump_toml
from ...errors import GptError
from ...fsutil import atomic_path, atomic_write_json, atomic_write_text, check_output
from ...rundir import (
    CLIENT_STATE,
    LATEST,
    MANIFEST,
    MODEL_DIR,
    RESOLVED_CONFIG,
    TAG_PATTERN,
    checkpoints_dir,
    complete_checkpoints,
    refuse_existing_run,
    refuse_outputs_without_checkpoints,
    remove_checkpoint,
    remove_run_files,
    step_of_tag,
)
from ..launching.lock import broadcast_from_rank0


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def config_hash(project: Project) -> str:
    return hashlib.sha256(dump_toml(project).encode()).hexdigest()[:16]


UNREADABLE_LATEST = "latest (not a checkpoint tag)"  # how a `latest` that names no tag is shown


def latest_text(path: Path) -> str:
    """The tag in a `latest` file, or UNREADABLE_LATEST when it holds anything else (damage such as random
    bytes, which must not reach the terminal)."""
    text = path.read_bytes()[:64].decode("ascii", errors="replace").strip()
    return text if TAG_PATTERN.match(text) else UNREADABLE_LATEST


def read_latest(run_dir: Path) -> Optional[str]:
    """The tag `latest` names, when it names a checkpoint whose client state exists."""
    path = checkpoints_dir(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = latest_text(path)
    if tag == UNREADABLE_LATEST:
        raise GptError(f"{path} does not name a checkpoint (it holds {path.stat().st_size:,} bytes, not a tag such "
                       "as step_00000100); write the tag of an intact checkpoint into it, or delete it.")
    if not (checkpoints_dir(run_dir) / tag / CLIENT_STATE).is_file():
        raise GptError(f"{path} names checkpoint {tag!r}, which is missing or incomplete.")
    return tag


def agree_on_resume(run_dir: Path, mode: str, restart: bool, rank: int,
                    data_dirs: Sequence[Path] = ()) -> Optional[str]:
    """The checkpoint tag every rank resumes from (None: start fresh). Rank 0 decides, every rank follows:
    each rank reading the dir on its own could pick different tags while a save or a fallback is under way."""
    decision: dict[str, Optional[str]] = {"tag": None, "error": None}
    if rank == 0:
        try:
            decision["tag"] = decide_start(run_dir, mode, restart, data_dirs)
        except GptError as error:
            decision["error"] = str(error)
    decision = broadcast_from_rank0(decision)
    if decision["error"]:
        raise GptError(decision["error"])
    return decision["tag"]


def check_model_dir_is_ours(run_dir: Path, data_dirs: Sequence[Path] = ()) -> None:
    """RUN/model, which a run replaces when it ends and --restart deletes, must pass fsutil's output rule
    before anything is trained or deleted: a model dir that gptcli wrote (or nothing), never a link, a
    file, a dir holding a user's files, or a data dir of the project (nor inside it, nor holding it)."""
    from ...modeldir import legacy_model_dir_files

    model_dir = Path(run_dir) / MODEL_DIR
    protected = [(Path(directory), f"a data dir of the project ({directory})") for directory in data_dirs]
    check_output(model_dir, what="model dir", force=True, owned=legacy_model_dir_files(model_dir),
                 protected=protected, flag=None, instead="move it away or choose another project.out_dir")



def decide_start(run_dir: Path, mode: str, restart: bool, data_dirs: Sequence[Path] = ()) -> Optional[str]:
    """Rank 0: RUN/model must be one the run may replace; --restart clears the old run; --resume never
    refuses to start over an existing one; auto|required pick the checkpoint to resume, and a run dir
    holding a finished run's outputs without any checkpoint is refused like an existing run."""
    if restart:
        if mode == "required":
            raise GptError("--restart starts the run over, so it cannot go with --resume required.")
        check_model_dir_is_ours(run_dir, data_dirs)  # before anything is deleted
        remove_run_files(run_dir)
        return None
    check_model_dir_is_ours(run_dir, data_dirs)  # before training: the run's end replaces it
    if mode == "never":
        refuse_existing_run(run_dir)
        return None
    tag = find_resume(run_dir, mode)
    if tag is None:
        refuse_outputs_without_checkpoints(run_dir)
    return tag


def find_resume(run_dir: Path, mode: str) -> Optional[str]:
    """The newest intact checkpoint (`latest` first, then older complete ones, newest first), warning about
    each damaged one passed over; None when there is none at all (refused under --resume required)."""
    root = checkpoints_dir(run_dir)
    damaged: list[tuple[str, list[str]]] = []  # (tag, its problems)
    for tag in resume_candidates(run_dir):
        problems = check_checkpoint(root / tag) if tag != UNREADABLE_LATEST else ["it does not hold a checkpoint tag"]
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
    latest = latest_text(latest_path) if latest_path.is_file() else None
    complete = complete_checkpoints(root)
    if latest is None:
        return [tag for _, tag in sorted(complete, reverse=True)]
    match = TAG_PATTERN.match(latest)
    limit = int(match.group(1)) if match else float("inf")
    return [latest] + [tag for step, tag in sorted(complete, reverse=True) if step < limit and tag != latest]


# --- manifests: what a checkpoint held when it was saved ---------------------------------------------------


def write_manifest(directory: Path, leave_out: Sequence[str] = ()) -> None:
    """Record every file's size and sha256 (but `leave_out`: files that were there before the save, not
    the checkpoint's); called once all ranks have written theirs, before `latest`."""
    files = [name for name in checkpoint_files(directory) if name not in set(leave_out)]
    digests = sha256_files(directory, files)
    atomic_write_json(directory / MANIFEST, {"files": {
        name: {"bytes": (directory / name).stat().st_size, "sha256": digests[name]} for name in files}})


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


HASH_BLOCK_BYTES = 1 << 20


def sha256_files(directory: Path, names: list[str]) -> dict[str, str]:
    """In threads: hashlib releases the GIL while it hashes, so a large checkpoint's files hash in parallel."""
    def digest(name: str) -> str:
        # Block by block, as hashlib.file_digest does (Python 3.11+; gptcli runs on 3.10 too).
        sha256 = hashlib.sha256()
        with open(directory / name, "rb") as handle:
            while block := handle.read(HASH_BLOCK_BYTES):
                sha256.update(block)
        return sha256.hexdigest()

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(digest, names), strict=True))


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
    foreign = []
    if rank == 0 and (root / tag).exists():
        foreign = remove_checkpoint(root / tag)  # a partial save of the same step by a run that crashed
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
        write_manifest(root / tag, leave_out=foreign)
        atomic_write_text(root / LATEST, tag + "\n")
        prune(root, keep, tag)
    dist.barrier()
    return tag


def prune(root: Path, keep: int, latest: str) -> None:
    """Keep the newest `keep` complete checkpoints up to `latest`, which itself always stays; anything newer
    than `latest`, or never finished, is a partial save of a crashed run and goes too. Only the files a
    checkpoint's manifest lists (lock.remove_checkpoint) are deleted: a user's file in one stays, with a note."""
    latest_step = step_of_tag(latest)
    complete = sorted((step, tag) for step, tag in complete_checkpoints(root) if step <= latest_step)
    kept = {tag for _, tag in complete[-keep:]} | {latest}
    for path in sorted(root.iterdir()):
        if TAG_PATTERN.match(path.name) and path.is_dir() and not path.is_symlink() and path.name not in kept:
            left = remove_checkpoint(path)
            if left:
                print(f"note: kept {path}, which holds files gptcli did not write ({', '.join(left[:3])}); its "
                      "checkpoint files were deleted.", file=sys.stderr)


def load(engine, run_dir: Path, tag: str, universal: Optional[Path] = None) -> dict:
    """Load DeepSpeed's state (from `universal`, the checkpoint converted for another number of ranks, when
    given: reshard.py) and this rank's RNG states, when the checkpoint has them (a rank that did not exist
    when it was saved has none: see reshard.new_rank_seed); returns the client state."""
    import deepspeed.comm as dist

    root = checkpoints_dir(run_dir)
    client = read_client_state(run_dir, tag)
    load_dir, load_tag = (universal.parent, universal.name) if universal is not None else (root, tag)
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise GptError(f"DeepSpeed could not load checkpoint {root / tag}.")
        if dist.get_rank() < client.get("world_size", dist.get_world_size()):
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


def write_resolved_config(run_dir: Path, project: Project) -> None:
    atomic_write_text(Path(run_dir) / RESOLVED_CONFIG, dump_toml(project))
