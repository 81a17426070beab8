"""One `gpt train` per run directory, and a run directory every rank can see.

    RUN/.gptcli-lock    {"host", "pid", "started", "command"} of the process that owns the run dir (rank 0)

Rank 0 locks the run dir for the whole run (locks.FileLock: an exclusive `flock` the kernel drops when
its holder dies, however it dies); the other ranks never touch it. A second `gpt train` on the same dir
is refused with one sentence naming the holder; a lock whose holder is gone is taken over with a note;
a lock of another host is refused with the name of the file to delete once that run is known to be
gone. A clean exit removes the file.

At start, rank 0 also writes a probe file with a random token into the run dir and every other rank
checks that it reads the same token there: ranks on nodes that do not share the run dir would otherwise
each write their own partial checkpoints and never resume.

(The run dir's layout, and what in it gptcli wrote, are rundir.py's.)
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Optional

from ...errors import GptError, RankAgreedError
from ...locks import FileLock, Holder
from ...paths import open_for_writing
from ...rundir import LOCK_FILE, PROBE_FILE


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
        outcome: dict[str, Optional[str]] = {"error": None, "token": None}
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
            raise RankAgreedError(outcome["error"])
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
        with open_for_writing(run_dir / PROBE_FILE, "w") as probe:
            probe.write(token)
    except OSError as error:
        raise GptError(f"Cannot write to the run dir {run_dir}: {error.strerror}; choose a writable "
                       "project.out_dir.") from None
    return token


def check_shared(run_dir: Path, rank: int, token: Optional[str]) -> None:
    """Refuse, on every rank, when some rank does not read rank 0's probe file in its run dir. `token`: what
    rank 0 wrote in it (None on a rank above 0 without torch.distributed, which has no one to compare with)."""
    probe = run_dir / PROBE_FILE
    if world_size() > 1:
        import torch.distributed as dist

        try:
            seen = probe.read_text() == token
        except (OSError, UnicodeDecodeError):
            seen = False
        views = [("", False)] * world_size()  # (host, whether it read the probe) of each rank, gathered
        dist.all_gather_object(views, (socket.gethostname(), seen))
        blind = [(other, host) for other, (host, ok) in enumerate(views) if not ok]
        if blind:
            if rank == 0:
                probe.unlink(missing_ok=True)
            # Every rank refuses here together: they leave the process group together, before the error, so
            # that no rank's gloo threads outlive rank 0's store at its exit (C++ aborted a rank once so,
            # "terminate called without an active exception", after it had said the sentence below).
            dist.barrier()
            dist.destroy_process_group()
            other, host = blind[0]
            raise GptError(f"The run dir {run_dir} is not shared by all ranks: rank {other} on host {host} does not "
                           "see the file rank 0 wrote there; put project.out_dir on a file system that every node "
                           "mounts at the same path.")
    if rank == 0:
        probe.unlink(missing_ok=True)


