"""One `gpt train` per run directory, a run directory every rank can see, and what in it is gptcli's.

    RUN/.gptcli-lock    {"host", "pid", "started", "command"} of the process that owns the run dir (rank 0)

Rank 0 locks the run dir for the whole run (locks.FileLock: an exclusive `flock` the kernel drops when
its holder dies, however it dies); the other ranks never touch it. A second `gpt train` on the same dir
is refused with one sentence naming the holder; a lock whose holder is gone is taken over with a note;
a lock of another host is refused with the name of the file to delete once that run is known to be
gone. A clean exit removes the file.

At start, rank 0 also writes a probe file with a random token into the run dir and every other rank
checks that it reads the same token there: ranks on nodes that do not share the run dir would otherwise
each write their own partial checkpoints and never resume.

What gptcli wrote in a run dir is known by name (`run_files`), and inside a checkpoint dir by its
manifest: `--restart` and checkpoint retention delete those and nothing else, and RUN/model is checked
by fsutil's output rule (never a link, never the data dir, never a dir holding a user's files) before
anything is deleted or trained.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Optional

from ..errors import GptError
from ..fsutil import check_output
from ..locks import FileLock, Holder
from .chatter import LOG_FILE as LIBRARY_LOG
from .metrics import CSV_FILE, METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR
from .trackers import TRACKERS_FILE

LOCK_FILE = ".gptcli-lock"
PROBE_FILE = ".gptcli-probe"

# The layout of a run dir (docs/training.md).
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
CLIENT_STATE = "client_state.json"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
RESOLVED_CONFIG = "config.resolved.toml"
MODEL_DIR = "model"
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies these beside the checkpoints
# What a checkpoint dir holds when it has no readable manifest (a save cut short): DeepSpeed's model and
# optimizer states (`mp_rank_00_model_states.pt`, `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`,
# ZeRO-3's `zero_pp_rank_R_mp_rank_00_model_states.pt`), the RNG states, the client state, temporary files.
CHECKPOINT_FILES = ("*_model_states.pt", "*_optim_states.pt", "rng_rank*.pt", CLIENT_STATE, MANIFEST, ".*.tmp")


def check_usable(run_dir: Path) -> None:
    """One sentence instead of a traceback when the run dir cannot be a directory we write to."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise GptError(f"project.out_dir {run_dir} is a symbolic link to nothing; choose another out_dir.")
    if run_dir.exists() and not run_dir.is_dir():
        raise GptError(f"project.out_dir {run_dir} is a file, not a directory; choose another out_dir.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GptError(f"Cannot create the run dir {run_dir}: {error.strerror}; choose a writable "
                       "project.out_dir.") from None
    if not os.access(run_dir, os.W_OK):  # root passes this everywhere but on a read-only file system
        raise GptError(f"The run dir {run_dir} is not writable; choose a writable project.out_dir.")


class RunDirLock(FileLock):
    """The exclusive lock of one run dir, held by one process."""

    def __init__(self, run_dir: Path):
        run_dir = Path(run_dir)
        super().__init__(run_dir / LOCK_FILE, run_dir, "gpt train", where=f"the run dir {run_dir}",
                         instead="choose another project.out_dir")
        self.run_dir = run_dir


def in_use(run_dir: Path, holder: Optional[Holder]) -> GptError:
    return RunDirLock(run_dir).in_use(holder)


class RunDirClaim:
    """What a run holds on its run dir: the lock on rank 0. A context manager, so that whatever `take`
    acquired is given back on every way out of the block (a return, an error, a signal turned into an
    exception); a kill -9 leaves a stale lock that the next run takes over."""

    def __init__(self):
        self.lock: Optional[RunDirLock] = None

    def __enter__(self) -> "RunDirClaim":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def take(self, run_dir: Path, rank: int) -> None:
        """Every rank calls this once torch.distributed is up (or alone, without it): rank 0 checks the run
        dir, locks it and writes the probe; every rank learns rank 0's outcome, then checks the probe."""
        run_dir = Path(run_dir)
        outcome = {"error": None, "token": None}
        if rank == 0:
            try:
                check_usable(run_dir)
                lock = RunDirLock(run_dir)
                note = lock.acquire()
                self.lock = lock
                if note:
                    print(note, file=sys.stderr)
                outcome["token"] = write_probe(run_dir)
            except GptError as error:
                outcome["error"] = str(error)
        outcome = broadcast_from_rank0(outcome)
        if outcome["error"]:
            raise GptError(outcome["error"])
        check_shared(run_dir, rank, outcome["token"])


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (itself alone without torch.distributed)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_probe(run_dir: Path) -> str:
    token = secrets.token_hex(16)
    try:
        (run_dir / PROBE_FILE).write_text(token)
    except OSError as error:
        raise GptError(f"Cannot write to the run dir {run_dir}: {error.strerror}; choose a writable "
                       "project.out_dir.") from None
    return token


def check_shared(run_dir: Path, rank: int, token: str) -> None:
    """Refuse, on every rank, when some rank does not read rank 0's probe file in its run dir."""
    probe = run_dir / PROBE_FILE
    if world_size() > 1:
        import torch.distributed as dist

        try:
            seen = probe.read_text() == token
        except (OSError, UnicodeDecodeError):
            seen = False
        views = [None] * world_size()
        dist.all_gather_object(views, (socket.gethostname(), seen))
        blind = [(other, host) for other, (host, ok) in enumerate(views) if not ok]
        if blind:
            if rank == 0:
                probe.unlink(missing_ok=True)
            other, host = blind[0]
            raise GptError(f"The run dir {run_dir} is not shared by all ranks: rank {other} on host {host} does not "
                           "see the file rank 0 wrote there; put project.out_dir on a file system that every node "
                           "mounts at the same path.")
    if rank == 0:
        probe.unlink(missing_ok=True)


# --- what in a run dir is gptcli's -------------------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


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
    """What `gpt train` wrote into a run dir, and nothing else: checkpoints, metrics, the loss plot, the
    resolved config, the library log, the tracker run ids, TensorBoard events, the consolidated model."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in (METRICS_FILE, CSV_FILE, PLOT_FILE, RESOLVED_CONFIG, LIBRARY_LOG, TRACKERS_FILE)
             if (run_dir / name).is_file()]
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


def check_model_dir_is_ours(run_dir: Path, data_dir: Optional[Path] = None) -> None:
    """RUN/model, which a run replaces when it ends and --restart deletes, must pass fsutil's output rule
    before anything is trained or deleted: a model dir that gptcli wrote (or nothing), never a link, a
    file, a dir holding a user's files, or the project's data dir (nor inside it, nor holding it)."""
    from ..modeldir import legacy_model_dir_files

    model_dir = Path(run_dir) / MODEL_DIR
    protected = [(data_dir, f"the project's data dir (data.dir = {data_dir})")] if data_dir is not None else []
    check_output(model_dir, what="model dir", force=True, owned=legacy_model_dir_files(model_dir),
                 protected=protected, flag=None, instead="move it away or choose another project.out_dir")


def remove_run_files(run_dir: Path, data_dir: Optional[Path] = None) -> None:
    """--restart: delete what `gpt train` wrote (never a file it did not write), noting what went."""
    run_dir = Path(run_dir)
    check_model_dir_is_ours(run_dir, data_dir)  # before anything is deleted
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
