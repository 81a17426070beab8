"""Writing files so that a crash or Ctrl-C never leaves one that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import GptError, Stopped


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is fsynced and renamed onto `path` only if the block
    finishes, and removed if it raises (KeyboardInterrupt included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the final file gets the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path | str) -> None:
    """Give a file the permissions the umask allows (0644 under umask 022). For writers that create files
    0600 whatever the umask, such as safetensors' save_file, so other users may read a shared model."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


OWNED_FILES = ".gptcli-files"  # in every directory the tool publishes: the names it wrote there (JSON list)


def staging_dir(target: Path | str, purpose: str) -> Path:
    """A new hidden sibling of `target` to build it in (same file system, so publishing is one rename).

    Its name carries `purpose` and this process's pid; staging dirs of the same target and purpose whose
    process is gone (a kill -9, a power cut) are removed first, so they never pile up."""
    target = Path(target)
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{purpose}-"
    for stale in parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


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


def read_owned(directory: Path) -> Optional[set[str]]:
    """The names the tool wrote into `directory` (its OWNED_FILES list), or None without a readable list."""
    try:
        names = json.loads((Path(directory) / OWNED_FILES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return set(names) | {OWNED_FILES}


def check_replaceable(target: Path | str, *, force: bool, what: str, inputs: Iterable[Path | str] = (),
                      owned: Optional[set[str]] = None) -> None:
    """Refuse, before any work, to put a new `what` (e.g. "prepared data") at `target` when that would lose
    something: a file in the way; an existing non-empty dir without `force`; and even with `force`, a dir
    holding anything the tool did not write (per its OWNED_FILES list, or `owned` for dirs written before
    that list existed), a `.git`, or an input of the same command."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise GptError(f"{target} is a file, not a directory; choose another output directory.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise GptError(f"{target} already exists and is not empty; pass --force to replace the {what} there, "
                       "or choose another output directory.")
    resolved = target.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if item == resolved or resolved in item.parents:
            raise GptError(f"{target} holds {item.name}, an input of this command; --force never deletes an "
                           "input, so choose another output directory.")
    if (target / ".git").exists():
        raise GptError(f"{target} is a git repository (it holds .git); --force never deletes one, so choose "
                       "another output directory.")
    ours = read_owned(target) if owned is None else set(owned) | {OWNED_FILES}
    if ours is None:
        raise GptError(f"{target} holds no record of files written by gptcli ({OWNED_FILES}), so --force does "
                       "not replace it; choose another output directory or empty it yourself.")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GptError(f"{target} holds files gptcli did not write ({shown}); --force replaces only the {what} "
                       "it wrote, so move them or choose another output directory.")


def publish_dir(staging: Path, target: Path) -> None:
    """Rename a finished `staging` dir to `target`, first listing what it holds in its OWNED_FILES (so a
    later `--force` knows what it may replace). An existing `target` is renamed aside first and deleted
    after, so `target` never holds a mix of old and new files. Callers check `target` with
    `check_replaceable` before doing any work."""
    names = sorted(p.name for p in Path(staging).iterdir() if p.name != OWNED_FILES)
    atomic_write_json(Path(staging) / OWNED_FILES, names)
    old = None
    if target.exists():
        old = target.absolute().parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: Path | str, purpose: str) -> Iterator[Path]:
    """Build a new `target` in a staging dir (see `staging_dir`): it is published (`publish_dir`) when the
    block finishes and removed when it raises, so `target` is either the old dir or the complete new one.
    A stop by signal or Ctrl-C is re-raised as `Stopped`, saying that `target` was left as it was."""
    target = Path(target)
    staging = staging_dir(target, purpose)
    try:
        yield staging
    except (KeyboardInterrupt, Stopped) as stop:
        shutil.rmtree(staging, ignore_errors=True)
        signal_number = getattr(stop, "signal_number", signal.SIGINT)
        raise Stopped(signal_number, f"{purpose} stopped before {target} was complete; {target} was left as it "
                                     "was and the partial files were removed.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        with signals_deferred():  # two renames: a stop between them would leave no `target` at all
            publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends; their handlers then run as usual."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
