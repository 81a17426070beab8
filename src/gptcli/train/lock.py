"""One `gpt train` per run directory, and a run directory every rank can see.

    RUN/.gptcli-lock    {"host", "pid", "started"} of the process that owns the run dir (rank 0)

Rank 0 takes an exclusive `flock` on the lock file for the whole run and writes who it is into it; the
other ranks never touch it. A second `gpt train` on the same dir fails to take the flock and is refused
with one sentence naming the holder. The kernel drops the flock when its holder dies, however it dies,
so on the holder's own host a lock file whose flock is free is stale (a `kill -9`, a power cut) and is
taken over with a note. A lock file that names another host cannot be judged from here (flock does not
reach every shared file system), so it is refused with a sentence saying which file to delete once that
run is known to be gone. A clean exit removes the file.

At start, rank 0 also writes a probe file with a random token into the run dir and every other rank
checks that it reads the same token there: ranks on nodes that do not share the run dir would otherwise
each write their own partial checkpoints and never resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import GptError
from ..fsutil import process_alive

LOCK_FILE = ".gptcli-lock"
PROBE_FILE = ".gptcli-probe"


@dataclass
class Holder:
    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def check_usable(run_dir: Path) -> None:
    """One sentence instead of a traceback when the run dir cannot be a directory we write to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GptError(f"project.out_dir {run_dir} is a file, not a directory; choose another out_dir.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GptError(f"Cannot create the run dir {run_dir}: {error.strerror}; choose a writable "
                       "project.out_dir.") from None
    if not os.access(run_dir, os.W_OK):  # root passes this everywhere but on a read-only file system
        raise GptError(f"The run dir {run_dir} is not writable; choose a writable project.out_dir.")


class RunDirLock:
    """The exclusive lock of one run dir, held by one process."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock or raise a GptError naming its holder; returns a note when a stale lock was taken over."""
        fd, flocked = self._open_and_flock()
        try:
            previous = read_holder(fd)
            note = None
            if previous is not None and (previous.host, previous.pid) != (socket.gethostname(), os.getpid()):
                if previous.host != socket.gethostname():
                    raise GptError(f"{self.run_dir} is locked by gpt train {previous.describe()}; if that run is no "
                                   f"longer running, delete {self.path} and start again.")
                if not flocked and process_alive(previous.pid):
                    raise in_use(self.run_dir, previous)
                note = (f"note: took over the lock of {self.run_dir} from {previous.describe()}, which is no "
                        "longer running.")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(Holder.me().__dict__) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return note

    def _open_and_flock(self) -> tuple[int, bool]:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise GptError(f"Cannot write to the run dir {self.run_dir}: {error.strerror}; choose a writable "
                               "project.out_dir.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                raise in_use(self.run_dir, holder) from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                return fd, False  # no flock on this file system: the pid in the file decides
            if same_file(fd, self.path):
                return fd, True
            os.close(fd)  # its holder released (removed) it between our open and our flock: try again

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if same_file(self.fd, self.path):
                os.unlink(self.path)  # still ours: remove it before the flock goes with the descriptor
        finally:
            os.close(self.fd)
            self.fd = None


def in_use(run_dir: Path, holder: Optional[Holder]) -> GptError:
    who = holder.describe() if holder else "a process that has not yet written its name"
    return GptError(f"{run_dir} is in use by another gpt train ({who}); wait for it to finish or stop it, "
                    "or choose another project.out_dir.")


def read_holder(fd: int) -> Optional[Holder]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # empty (a fresh file) or unreadable


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


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
