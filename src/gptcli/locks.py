"""One writer at a time: the exclusive lock of something gptcli writes (a run dir, an output dir).

    LOCK FILE    {"host", "pid", "started", "command"} of the process that holds it

The holder takes an exclusive `flock` on the lock file for as long as it writes and puts who it is into
it. Another process fails to take the flock and is refused with one sentence naming the holder. The
kernel drops the flock when its holder dies, however it dies, so on the holder's own host a lock file
whose flock is free is stale (a `kill -9`, a power cut) and is taken over with a note. A lock file that
names another host cannot be judged from here (flock does not reach every shared file system), so it
is refused with a sentence saying which file to delete once that writer is known to be gone. Releasing
removes the file.

train/lock.py locks a run dir with this; fsutil.output_lock locks the target of every published dir.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import GptError
from .paths import open_descriptor


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@dataclass
class Holder:
    host: str
    pid: int
    started: str
    command: str = ""

    @classmethod
    def me(cls, command: str) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


class LockBusy(GptError):
    """The lock is held by a live process (`holder`, when it has written its name), or by one on another
    host, which cannot be judged from here."""

    def __init__(self, message: str, holder: Optional[Holder]):
        super().__init__(message)
        self.holder = holder


class FileLock:
    """The exclusive lock of `target`, held through the file `path` by one process.

    `command` names the holder in messages ("gpt train"); `where` names what is written ("the run dir X")
    and `instead` says what to do when it is busy ("choose another project.out_dir")."""

    def __init__(self, path: Path, target: Path, command: str, where: str, instead: str):
        self.path = Path(path)
        self.target = Path(target)
        self.command, self.where, self.instead = command, where, instead
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock or raise a GptError naming its holder; returns a note when a stale lock was taken over."""
        fd, flocked = self._open_and_flock()
        try:
            previous = read_holder(fd)
            note = None
            if previous is not None and (previous.host, previous.pid) != (socket.gethostname(), os.getpid()):
                if previous.host != socket.gethostname():  # busy as far as this host can tell
                    raise LockBusy(f"{self.target} is locked by {previous.command or self.command} "
                                   f"{previous.describe()}; if it is no longer running, delete {self.path} and "
                                   "start again.", previous)
                if not flocked and process_alive(previous.pid):
                    raise self.in_use(previous)
                note = (f"note: took over the lock of {self.target} from {previous.describe()}, which is no "
                        "longer running.")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(Holder.me(self.command).__dict__) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return note

    def in_use(self, holder: Optional[Holder]) -> LockBusy:
        who = holder.describe() if holder else "a process that has not yet written its name"
        command = holder.command if holder and holder.command else self.command
        return LockBusy(f"{self.target} is in use by another {command} ({who}); wait for it to finish or stop it, "
                        f"or {self.instead}.", holder)

    def _open_and_flock(self) -> tuple[int, bool]:
        while True:
            try:
                fd = open_descriptor(self.path, os.O_RDWR | os.O_CREAT, instead="remove the link")
            except OSError as error:
                raise GptError(f"Cannot write to {self.where}: {error.strerror}; {self.instead}.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                raise self.in_use(holder) from None
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


def read_holder(fd: int) -> Optional[Holder]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # empty (a fresh file) or unreadable


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
