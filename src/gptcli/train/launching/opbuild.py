"""DeepSpeed's CPU communication op, built so that a kill or a Ctrl-C never blocks the next run.

DeepSpeed compiles `deepspeed_shm_comm` the first time a machine trains on the CPU (build_time()), through
torch's extension builder: `ninja` and the compiler run in the op's build dir under a lock file torch
creates there (TORCH_EXTENSIONS_DIR/.../deepspeed_shm_comm/lock) and every later load waits on for as
long as it exists, saying nothing. A build killed halfway (kill -9, Ctrl-C) used to leave both behind:
the compilers running on for minutes under PID 1, and a lock that made every later `gpt train` wait for
ever. So, before DeepSpeed starts on the CPU, each rank:

1. takes gptcli's own lock on the build dir (`.gptcli-build-lock`, a flock: the kernel drops it however
   its holder dies), waiting for another gptcli build with a line saying so;
2. looks at torch's lock: one that no process is building under (no process works in the build dir) and
   that is older than STALE_SECONDS is left from a killed build and is removed with a note; one that a
   live process holds (a build outside gptcli) is waited for, with a line naming it;
3. builds the op, when it is not built yet, in a helper process of its own process group that dies with
   this one: on the parent's death (Linux's parent-death signal), a Ctrl-C or a SIGTERM it stops ninja and
   the compilers and removes torch's lock before it exits, so nothing of the build outlives the run.

DeepSpeed then finds the op built and only loads it.

"Built" means built for this Python environment. torch's build dir is per Python version, not per virtual
environment, and the build's command lines name the include dirs of the torch that built it: a second venv
(or another torch or DeepSpeed) sharing the dir makes DeepSpeed rebuild the op inside its own start, unannounced
and outside the helper, where a kill leaves the compilers and the lock behind. So gptcli writes beside the op
what it was built for (BUILD_STAMP) and has the helper rebuild it, with a line saying why, when that differs.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Optional

from ...errors import GptError
from ...fsutil import atomic_write_json
from ...locks import FileLock, LockBusy
from ...paths import read_input_text
from .importing import import_deepspeed

OP_NAME = "deepspeed_shm_comm"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build dir
GPTCLI_LOCK = ".gptcli-build-lock"
BUILD_LOG = ".gptcli-build.log"
BUILD_STAMP = ".gptcli-build.json"  # build_environment() of the build beside it
STAMP_BYTES = 64 * 1024  # a stamp is a few hundred bytes
NOTE_AFTER_SECONDS = 3.0  # a wait longer than this says on the terminal what it waits for
STALE_SECONDS = 10.0  # a torch lock with no process in the build dir for this long is a killed build's
POLL_SECONDS = 0.5

Say = Callable[[str], None]
HELPER = [sys.executable, "-m", "gptcli.train.launching.opbuild"]  # this module's helper_main, given the build dir


def build_directory() -> Path:
    """Where torch builds the op (TORCH_EXTENSIONS_DIR, else its per-Python, per-flavour cache)."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return Path(_get_build_directory(OP_NAME, False))
    except OSError as error:
        root = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's extension cache")
        raise GptError(f"Cannot create the build dir of DeepSpeed's CPU communication op under {root}: "
                       f"{error.strerror or error}; set TORCH_EXTENSIONS_DIR to a writable directory.") from None


def op_present(directory: Path) -> bool:
    """Whether an op was built in `directory`, for whichever environment."""
    return bool(glob.glob(str(directory / f"{OP_NAME}*.so")))


@functools.cache
def build_environment() -> dict[str, str]:
    """What a build of the op depends on besides its sources, in the words of its stamp: the versions of torch
    and DeepSpeed and where they are installed (their include dirs are in the build's command lines), and
    Python's headers. DeepSpeed is found, not imported. Asked once per process: pre-flight, the build check
    and the start-up line all ask."""
    import torch

    spec = importlib.util.find_spec("deepspeed")
    try:
        deepspeed_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path: its place still tells it apart
        deepspeed_version = ""
    return {"torch": torch.__version__, "torch_dir": str(Path(torch.__file__).parent),
            "deepspeed": deepspeed_version,
            "deepspeed_dir": str(Path(spec.origin).parent) if spec and spec.origin else "",
            "python_include": sysconfig.get_paths()["include"]}


def stamp_of(directory: Path) -> Optional[dict]:
    """The environment the op in `directory` was built for; None when gptcli did not build it (or the stamp
    is unreadable)."""
    try:
        stamp = json.loads(read_input_text(directory / BUILD_STAMP, "The op's build stamp", STAMP_BYTES))
    except (GptError, ValueError):  # absent, not a regular file (a FIFO would block), too large, not JSON
        return None
    return stamp if isinstance(stamp, dict) else None


def op_built(directory: Path) -> bool:
    """Whether the op in `directory` was built for this environment."""
    return op_present(directory) and stamp_of(directory) == build_environment()


def rebuild_reason(directory: Path) -> str:
    """Why an op that is present is built again, in words."""
    stamp = stamp_of(directory)
    if stamp is None:
        return "it was built outside gptcli, perhaps for another Python environment"
    changed = [key for key, value in build_environment().items() if stamp.get(key) != value]
    return (f"it was built for another Python environment ({', '.join(changed)} differ); give each environment "
            "its own TORCH_EXTENSIONS_DIR to keep both builds")


def op_is_built() -> Optional[bool]:
    """Whether the op is built for this environment where torch builds it (None: that cannot be told, without
    a build dir)."""
    try:
        return op_built(build_directory())
    except GptError:
        return None


def build_time() -> str:
    """How long the build takes, in words: the planner's measured figure (OP_BUILD_SECONDS)."""
    from ...planner import plan

    return f"about {plan.OP_BUILD_SECONDS:.0f} s on 2 idle cores"


def prepare_cpu_comm_op(say: Say, directory: Optional[Path] = None) -> None:
    """Every rank, before DeepSpeed starts on the CPU: the op is built, and no lock of a dead build is left."""
    import_deepspeed()
    import deepspeed.ops

    if not deepspeed.ops.__compatible_ops__.get(OP_NAME, False):
        return  # DeepSpeed will not build it here (not Linux, no compiler): gloo alone
    directory = directory or build_directory()
    lock = FileLock(directory / GPTCLI_LOCK, directory, "gpt train", where=str(directory),
                    instead="set TORCH_EXTENSIONS_DIR to another directory")
    acquire_waiting(lock, say, "another gpt train that is building DeepSpeed's CPU communication op")
    try:
        clear_torch_lock(directory, say)
        if not op_built(directory):
            if op_present(directory):
                say(f"checking DeepSpeed's CPU communication op in {directory}, rebuilding it if need be "
                    f"({build_time()}): {rebuild_reason(directory)}")
            else:
                say(f"building DeepSpeed's CPU communication op in {directory} ({build_time()}, once per Python "
                    "environment)")
            build_in_helper(directory)
            atomic_write_json(directory / BUILD_STAMP, build_environment())
    finally:
        lock.release()


def acquire_waiting(lock: FileLock, say: Say, what: str, note_after: float = NOTE_AFTER_SECONDS,
                    poll: float = POLL_SECONDS) -> None:
    """Take `lock`, waiting while another live process holds it; say once, after `note_after` s, for whom."""
    started, said = time.monotonic(), False
    while True:
        try:
            note = lock.acquire()
            if note:
                say(note.removeprefix("note: "))
            return
        except LockBusy as busy:
            if not said and time.monotonic() - started >= note_after:
                holder = f" ({busy.holder.describe()})" if busy.holder else ""
                say(f"waiting for {what}{holder}; its lock is {lock.path}")
                said = True
        time.sleep(poll)


def clear_torch_lock(directory: Path, say: Say, stale_after: float = STALE_SECONDS, note_after: float = NOTE_AFTER_SECONDS,
                     poll: float = POLL_SECONDS) -> None:
    """Remove torch's lock when no process builds or loads under it; wait while one does. The note that a
    build was killed is said only when that is what happened: the op is not built. With the op built, the
    lock is a load's that ended without removing it (torch holds it while it checks a built op too), and
    goes without a word: nothing the user did or must do."""
    path = directory / TORCH_LOCK
    started, said = time.monotonic(), False
    while path.exists():
        workers = processes_in(directory) or holders_of(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        if not workers and age >= stale_after:
            path.unlink(missing_ok=True)
            if not op_present(directory):
                say(f"removed {path}, left by a build of DeepSpeed's CPU communication op that was killed "
                    "(no process is building there)")
            return
        if not said and time.monotonic() - started >= note_after:
            who = ", ".join(f"pid {pid} ({name})" for pid, name in workers[:3]) or "a process that just started"
            say(f"waiting for a build of DeepSpeed's CPU communication op in {directory}: {who}; it holds {path}")
            said = True
        time.sleep(poll)


def holders_of(path: Path) -> list[tuple[int, str]]:
    """(pid, name) of the processes that have `path` open: torch's lock is held open by the process that
    created it (FileBaton) until it removes it, whatever its working directory."""
    found = []
    target = os.path.realpath(path)
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.path.realpath(fd.path) == target for fd in os.scandir(f"/proc/{entry.name}/fd")):
                with open(f"/proc/{entry.name}/comm") as comm:
                    found.append((int(entry.name), comm.read().strip()))
        except OSError:
            continue  # gone, or not ours to look at
    return found


def processes_in(directory: Path) -> list[tuple[int, str]]:
    """(pid, name) of the processes working in `directory` (ninja and the compilers run there)."""
    found = []
    target = os.path.realpath(directory)
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.path.realpath(os.readlink(f"/proc/{entry.name}/cwd")) == target:
                with open(f"/proc/{entry.name}/comm") as comm:
                    found.append((int(entry.name), comm.read().strip()))
        except OSError:
            continue  # gone, or not ours to look at
    return found


def build_in_helper(directory: Path) -> None:
    """Build the op in a helper process (see the module docstring); wait for it. A stop while it builds
    (Ctrl-C, SIGTERM) stops it the same way, then goes on as the stop it is."""
    log = directory / BUILD_LOG
    with open(log, "w") as output:
        helper = subprocess.Popen([*HELPER, str(directory)], stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=functools.partial(term_with_parent, os.getpid()))
        try:
            code = helper.wait()
        except BaseException:
            stop_helper(helper)
            raise
    if code != 0:
        tail = " ".join(log.read_text(errors="replace").split()[-40:])
        raise GptError(f"Building DeepSpeed's CPU communication op failed (exit {code}); the end of {log}: {tail}")


def stop_helper(helper: subprocess.Popen) -> None:
    if helper.poll() is None:
        helper.send_signal(signal.SIGTERM)
    try:
        helper.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(helper.pid, signal.SIGKILL)
        helper.wait()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def term_with_parent(parent: int) -> None:
    """In the helper, before it runs: SIGTERM when the process that started it dies (even by SIGKILL); a
    parent already gone by then is seen by its pid."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


# --- the helper process ------------------------------------------------------------------------------------------


def stop_the_build(signum, frame) -> None:
    """The helper leads its own process group (ninja, the compilers): stop the group, remove torch's lock
    (the helper's own: gptcli's lock kept every other build out), exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    directory = Path(sys.argv[1])
    os.killpg(0, signal.SIGTERM)  # ninja stops the jobs it started on SIGTERM; the compilers die of it
    deadline = time.monotonic() + 5
    while group_members() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in group_members():
        os.kill(pid, signal.SIGKILL)
    (directory / TORCH_LOCK).unlink(missing_ok=True)
    os._exit(128 + signum)


def group_members() -> list[int]:
    """The other live processes of this process group."""
    members, group = [], os.getpgrp()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":  # pgrp is the 5th field, state the 3rd
                members.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return members


def helper_main() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop_the_build)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


if __name__ == "__main__":
    helper_main()
