"""The run dir: its layout, and what in it gptcli wrote. Everything that reads or writes a run dir names
its files from here; `--restart` and checkpoint retention delete what `run_files` and a checkpoint's
manifest list, and nothing else (a user's files beside them stay).

    RUN/config.resolved.toml       the project as the run resolved it
    RUN/metrics.jsonl, metrics.csv one record per optimizer step
    RUN/measured.json              what the run measured of itself: peak memory per rank, speed, and the
                                   settings they hold for (planner/measured.py)
    RUN/loss.png                   the loss curve, drawn at the end of a run (and by `gpt plot`)
    RUN/deepspeed.log              what DeepSpeed and the other libraries printed
    RUN/trackers.json              each tracker's run id, so that a resume continues the same tracker run
                                   (and the step TensorBoard last flushed)
    RUN/tensorboard/, RUN/mlflow/  TensorBoard events; MLflow's local store
    RUN/checkpoints/step_NNNNNNNN/ a checkpoint: DeepSpeed's files, client_state.json, rng_rank<R>.pt,
                                   manifest.json (written last); universal/ when it was resumed on other ranks
    RUN/checkpoints/latest         the tag of the newest complete checkpoint
    RUN/model/                     the consolidated model dir
    RUN/.gptcli-lock               the lock of the process that owns the run dir
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

from .errors import GptError

RESOLVED_CONFIG = "config.resolved.toml"
METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
MEASURED_FILE = "measured.json"
PLOT_FILE = "loss.png"
LIBRARY_LOG = "deepspeed.log"
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"  # MLflow's store when MLFLOW_TRACKING_URI is not set: RUN/mlflow/mlflow.db + artifacts
MODEL_DIR = "model"
LOCK_FILE = ".gptcli-lock"
PROBE_FILE = ".gptcli-probe"  # written by rank 0 at start and read by every rank: a run dir all ranks see
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
CLIENT_STATE = "client_state.json"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
UNIVERSAL = "universal"  # a checkpoint converted to DeepSpeed's universal format (train/state/reshard.py)
UNIVERSAL_COMPLETE = ".complete"  # written last inside universal/, so a dir without it is never trusted
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies these beside the checkpoints
# What a checkpoint dir holds when it has no readable manifest (a save cut short): DeepSpeed's model and
# optimizer states (`mp_rank_00_model_states.pt`, `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`,
# ZeRO-3's `zero_pp_rank_R_mp_rank_00_model_states.pt`), the RNG states, the client state, temporary files.
CHECKPOINT_FILES = ("*_model_states.pt", "*_optim_states.pt", "rng_rank*.pt", CLIENT_STATE, MANIFEST, ".*.tmp")


# --- what in a run dir is gptcli's: --restart and retention delete these and nothing else -------------------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_of_tag(tag: str) -> int:
    """The step a checkpoint tag names (step_00000100 → 100); ValueError for a name that is not a tag."""
    match = TAG_PATTERN.match(tag)
    if match is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag")
    return int(match.group(1))


def complete_checkpoints(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of each checkpoint dir that was finished: it has a manifest, or, saved before manifests
    existed, a client state."""
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = TAG_PATTERN.match(path.name)
        if match and path.is_dir() and ((path / MANIFEST).is_file() or (path / CLIENT_STATE).is_file()):
            found.append((int(match.group(1)), path.name))
    return found


def run_files(run_dir: Path) -> list[Path]:
    """What `gpt train` wrote into a run dir, and nothing else: checkpoints, metrics and the measurement,
    the loss plot, the resolved config, the library log, the tracker run ids, TensorBoard events, the consolidated model."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in (METRICS_FILE, CSV_FILE, MEASURED_FILE, PLOT_FILE, RESOLVED_CONFIG, LIBRARY_LOG,
                                         TRACKERS_FILE) if (run_dir / name).is_file()]
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if TAG_PATTERN.match(p.name) or p.name in (LATEST, *DEEPSPEED_SCRIPTS)
                        or (p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp")))
    if (run_dir / TENSORBOARD_DIR).is_dir():
        found += sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    if (run_dir / MODEL_DIR).exists() or (run_dir / MODEL_DIR).is_symlink():
        found.append(run_dir / MODEL_DIR)
    return found


def holds_run(run_dir: Path) -> bool:
    """A run has been trained here: a checkpoint, logged steps or a consolidated model."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    return (complete_checkpoints(checkpoints_dir(run_dir)) != [] or (checkpoints_dir(run_dir) / LATEST).is_file()
            or (metrics.is_file() and metrics.stat().st_size > 0) or finished_outputs(run_dir) != [])


def finished_outputs(run_dir: Path) -> list[str]:
    """What only a run that saved a checkpoint leaves: the consolidated model, the loss plot it draws at
    its end. (Metrics alone are those of a run killed before its first checkpoint: its steps are redone.)"""
    return [name for name in (MODEL_DIR, PLOT_FILE) if (Path(run_dir) / name).exists()]


def refuse_existing_run(run_dir: Path) -> None:
    if holds_run(run_dir):
        raise GptError(f"{run_dir} already holds a run, and --resume never does not delete it: pass --restart to "
                       "start over there (it deletes only what gpt train wrote), or choose another project.out_dir.")


def refuse_outputs_without_checkpoints(run_dir: Path) -> None:
    """A run dir with a finished run's outputs but no checkpoint (deleted, moved away) is an existing run:
    training from step 1 would replace its model and metrics."""
    left = finished_outputs(run_dir)
    if left:
        raise GptError(f"{run_dir} holds a run ({', '.join(left)}) but no checkpoint to resume from; pass --restart "
                       "to start over there (it deletes only what gpt train wrote), or choose another "
                       "project.out_dir.")
    metrics = Path(run_dir) / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        print(f"note: {run_dir} holds the metrics of a run stopped before its first checkpoint; starting over "
              "from step 1.", file=sys.stderr)


def remove_run_files(run_dir: Path) -> None:
    """--restart: delete what `gpt train` wrote (never a file it did not write), noting what went. The
    caller has checked RUN/model first (train/state/checkpoint.check_model_dir_is_ours)."""
    run_dir = Path(run_dir)
    files = run_files(run_dir)
    kept = []
    for path in files:
        if TAG_PATTERN.match(path.name) and path.parent == checkpoints_dir(run_dir):
            kept += [f"{path.name}/{name}" for name in remove_checkpoint(path)]
        elif path.is_dir() and not path.is_symlink():
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
    if kept:
        print(f"note: kept files gptcli did not write in {checkpoints_dir(run_dir)}: {', '.join(kept[:5])}.",
              file=sys.stderr)


def checkpoint_owned_files(directory: Path) -> list[Path]:
    """The files of a checkpoint dir that gptcli and DeepSpeed wrote: those its manifest lists (and the
    manifest), or without a readable manifest (a save cut short) those named like a checkpoint's files."""
    directory = Path(directory)
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
        names = {str(name) for name in listed} | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        names = None
    found = []
    for path in directory.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        name = str(path.relative_to(directory))
        if (name in names) if names is not None else any(fnmatch(path.name, p) for p in CHECKPOINT_FILES):
            found.append(path)
    return found


def remove_checkpoint(directory: Path) -> list[str]:
    """Delete a checkpoint dir's own files (checkpoint_owned_files) and the dir when nothing else is left;
    returns the names of what is left (a user's files, which are never deleted)."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return [directory.name] if directory.is_symlink() else []
    for path in checkpoint_owned_files(directory):
        path.unlink()
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    left = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir() or p.is_symlink())
    if not left and not any(directory.iterdir()):
        directory.rmdir()
    return left
