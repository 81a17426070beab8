"""Writing files so that a crash or Ctrl-C never leaves one that looks complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .errors import GptError, Stopped
from .locks import FileLock, process_alive
from .parsing import is_whole_number
from .paths import kind_of, refuse_link


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is fsynced and renamed onto `path` only if the block
    finishes, and removed if it raises (KeyboardInterrupt included). A symbolic link at `path` is refused,
    never replaced (paths.py)."""
    path = Path(path)
    refuse_link(path)
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


# --- a write that finds no room ---------------------------------------------------------------------------------

# No space left on the device, the file-size limit (`ulimit -f`: Python ignores SIGXFSZ, so the write fails with
# EFBIG), a disk quota.
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# How torch.save says the same: a RuntimeError of its zip writer, without the errno.
TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


def out_of_room(error: BaseException) -> Optional[str]:
    """Why `error` is a write that found no room, in words ("No space left on device"); None for any other
    error."""
    if isinstance(error, OSError) and error.errno in NO_ROOM:
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    for number in NO_ROOM:
        if os.strerror(number) in text:
            return os.strerror(number)
    if isinstance(error, RuntimeError) and any(words in text for words in TORCH_WRITE_FAILED):
        return "the write failed (no space left on the device, or the file-size limit)"
    return None


def no_room_sentence(error: BaseException, where: Path | str, kept: str) -> Optional[GptError]:
    """The one sentence for a write into `where` that found no room (out_of_room), saying what was kept; None
    for any other error, which goes on as it is."""
    why = out_of_room(error)
    if why is None:
        return None
    return GptError(f"Writing {where} failed: {why}; {kept}. Free some space (or raise the file-size limit) and "
                    "run again.")


@contextmanager
def room_to_write(where: Path | str, kept: str) -> Iterator[None]:
    """A block that writes `where`: a write that finds no room becomes no_room_sentence's GptError."""
    try:
        yield
    except Exception as error:
        sentence = no_room_sentence(error, where, kept)
        if sentence is None:
            raise
        raise sentence from None


OWNED_FILES = ".gptcli-files"  # in every directory the tool publishes: what it is and the names it wrote there
LOCK_SUFFIX = ".gptcli-lock"  # `.NAME.gptcli-lock` beside an output NAME while a command writes it (output_lock)


def staging_dir(target: Path | str, purpose: str) -> Path:
    """A new hidden sibling of `target` to build it in (same file system, so publishing is one rename).

    Its name carries `purpose` and this process's pid; staging dirs of the same target and purpose whose
    process is gone (a kill -9, a power cut) are removed first, so they never pile up."""
    target = Path(os.path.abspath(target))  # "out/." and "." have their dir's name, not ""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{purpose}-"
    for stale in parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):]
        if is_whole_number(pid) and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def read_owned(directory: Path) -> Optional[set[str]]:
    """The names the tool wrote into `directory` (its OWNED_FILES record), or None without a readable one."""
    record = read_owned_record(directory)
    return None if record is None else record[1]


def read_owned_record(directory: Path) -> Optional[tuple[Optional[str], set[str]]]:
    """(what the dir is, e.g. "prepared data", or None for a plain list written before that was recorded;
    the names the tool wrote there), or None without a readable OWNED_FILES."""
    try:
        record = json.loads((Path(directory) / OWNED_FILES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    what, names = (record.get("what"), record.get("files")) if isinstance(record, dict) else (None, record)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(what, (str, type(None))):
        return None
    return what, set(names) | {OWNED_FILES}


# --- the rule every output goes through ------------------------------------------------------------------------


def check_output(target: Path | str, *, what: str, directory: bool = True, force: bool = False,
                 inputs: Iterable[Path | str] = (), protected: Iterable[tuple[Path | str, str]] = (),
                 owned: Optional[set[str]] = None, replaces: Optional[Callable[[Path], bool]] = None,
                 flag: Optional[str] = "--force", instead: str = "choose another output") -> None:
    """Refuse, before any work, to write a `what` (a directory, or a file with `directory=False`) at
    `target` where that would lose or damage something:
    - something that is not what the command writes: a symbolic link (never replaced, never written
      through), a device, a FIFO, a file where a dir goes or a dir where a file goes; a file output whose
      directory does not exist (it is not created silently) or is not writable;
    - an input of the same command, or a `protected` (path, what it is) such as the project's data dir,
      when `target` is it, holds it or lies inside it;
    - a directory: anything non-empty without `force` (`flag` is the option that gives it; None when the
      command has none), and even then a `.git`, or a dir holding anything the tool did not write as a
      `what` (per its OWNED_FILES record, or `owned` for dirs written before that record existed);
    - a file: an existing one that `replaces` does not accept (it is not what the command writes)."""
    target = Path(target)
    _check_kind(target, what, directory, instead)
    if not directory:
        _check_parent(target, instead)
    for item in inputs:
        _check_apart(target, Path(item), "an input of this command", instead)
    for path, why in protected:
        _check_apart(target, Path(path), why, instead)
    if directory and target.is_dir() and _holds_cwd(target):
        raise GptError(f"{target} is the current directory or holds it; a dir is replaced by renaming it, which "
                       f"must not happen to the one you are in, so {instead}.")
    if directory:
        _check_dir_contents(target, what, force, owned, flag, instead)
    elif target.exists() and replaces is not None and not replaces(target):
        raise GptError(f"{target} exists and is not a {what}; only a {what} is replaced there, so {instead}.")


def check_replaceable(target: Path | str, *, force: bool, what: str, inputs: Iterable[Path | str] = (),
                      owned: Optional[set[str]] = None) -> None:
    """`check_output` for a directory that `--force` may replace (prepare, load-hf, export-hf)."""
    check_output(target, what=what, force=force, inputs=inputs, owned=owned, instead="choose another output directory")


def _holds_cwd(target: Path) -> bool:
    cwd, resolved = Path.cwd().resolve(), target.resolve()
    return resolved == cwd or resolved in cwd.parents


def _check_kind(target: Path, what: str, directory: bool, instead: str) -> None:
    if target.is_symlink():
        raise GptError(f"{target} is a symbolic link; gptcli never replaces a link nor writes through one, so give "
                       f"the real path or {instead}.")
    if not target.exists():
        return
    mode = target.stat().st_mode
    if directory and not stat.S_ISDIR(mode):
        raise GptError(f"{target} is {kind_of(mode)}, not a directory; {instead}.")
    if not directory and not stat.S_ISREG(mode):
        raise GptError(f"{target} is {kind_of(mode)}, not a regular file; a {what} is only written as a regular "
                       f"file, so {instead}.")


def _check_parent(target: Path, instead: str) -> None:
    parent = target.absolute().parent
    if not parent.exists():
        raise GptError(f"The directory {parent} does not exist (it is not created silently); create it, or "
                       f"{instead}.")
    if not parent.is_dir():
        raise GptError(f"{parent} is a file, not a directory; {instead}.")
    if not os.access(parent, os.W_OK):  # root passes this everywhere but on a read-only file system
        raise GptError(f"The directory {parent} is not writable; {instead}.")


def _check_apart(target: Path, other: Path, what_other_is: str, instead: str) -> None:
    """Refuse when `target` is `other`, holds it, or lies inside it (symbolic links resolved)."""
    resolved, other_resolved = target.resolve(), other.resolve()
    if resolved == other_resolved:
        where = f"is {what_other_is}"
    elif resolved in other_resolved.parents:
        where = f"holds {other.name}, {what_other_is}"
    elif other_resolved in resolved.parents:
        where = f"lies inside {other}, {what_other_is}"
    else:
        return
    raise GptError(f"{target} {where}, which gptcli never deletes or writes over; {instead}.")


def _check_dir_contents(target: Path, what: str, force: bool, owned: Optional[set[str]], flag: Optional[str],
                        instead: str) -> None:
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        passing = f"pass {flag} to replace the {what} there, or " if flag else ""
        raise GptError(f"{target} already exists and is not empty; {passing}{instead}.")
    again = f"{flag} replaces" if flag else "gptcli replaces"
    if (target / ".git").exists():
        raise GptError(f"{target} is a git repository (it holds .git); gptcli never deletes one, so {instead}.")
    record = (None, set(owned) | {OWNED_FILES}) if owned is not None else read_owned_record(target)
    if record is None:
        raise GptError(f"{target} holds no record of files written by gptcli ({OWNED_FILES}), so it is not "
                       f"replaced; {instead}, or empty it yourself.")
    written_as, ours = record
    if written_as is not None and written_as != what:
        raise GptError(f"{target} holds {written_as} written by gptcli; {again} only what it wrote as {what}, so "
                       f"{instead}.")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GptError(f"{target} holds files gptcli did not write ({shown}); {again} only the {what} it wrote, so "
                       f"move them or {instead}.")


@contextmanager
def output_lock(target: Path | str, command: str, check: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Hold the lock of the output `target` for the block: `.NAME.gptcli-lock` beside it, so it exists
    before `target` does and outlives its replacement. Every command that publishes a dir checks and
    writes it under this lock, so two never race for one target: the second is refused, naming the first
    (locks.FileLock). `check` (the command's check_output call) runs before anything is created, and
    again once the lock is held, when no other writer can change `target` any more."""
    target = Path(target)
    if check is not None:
        check()
    parent = Path(os.path.abspath(target)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GptError(f"Cannot write the output dir {target}: creating {parent} failed ({error.strerror or error}); "
                       "choose another output directory.") from None
    lock = FileLock(parent / f".{Path(os.path.abspath(target)).name}{LOCK_SUFFIX}", target, command, where=str(parent),
                    instead="choose another output directory")
    note = lock.acquire()
    if note:
        print(note, file=sys.stderr)
    try:
        if check is not None:
            check()
        yield
    finally:
        lock.release()


def publish_dir(staging: Path, target: Path, what: Optional[str] = None) -> None:
    """Rename a finished `staging` dir to `target`, first recording in its OWNED_FILES that it is a `what`
    and the names it holds (so a later `--force` knows what it may replace). An existing `target` is
    renamed aside first and deleted after, so `target` never holds a mix of old and new files. Callers
    check `target` with `check_output` before doing any work, under `output_lock`."""
    target = Path(os.path.abspath(target))
    names = sorted(p.name for p in Path(staging).iterdir() if p.name != OWNED_FILES)
    atomic_write_json(Path(staging) / OWNED_FILES, {"what": what, "files": names} if what else names)
    old = None
    if target.exists():
        old = target.absolute().parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: Path | str, purpose: str, what: Optional[str] = None) -> Iterator[Path]:
    """Build a new `target` in a staging dir (see `staging_dir`): it is published (`publish_dir`) when the
    block finishes and removed when it raises, so `target` is either the old dir or the complete new one.
    A stop by signal or Ctrl-C is re-raised as `Stopped`, saying that `target` was left as it was."""
    target = Path(target)
    kept = f"{target} was {'left as it was' if target.exists() else 'not created'} and the partial files were removed"
    with room_to_write(target, kept):  # a disk that fills is one sentence
        staging = staging_dir(target, purpose)
        try:
            yield staging
        except (KeyboardInterrupt, Stopped) as stop:
            shutil.rmtree(staging, ignore_errors=True)
            signal_number = getattr(stop, "signal_number", signal.SIGINT)
            raise Stopped(signal_number, f"{purpose} stopped before {target} was complete; {kept}.") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            with signals_deferred():  # two renames: a stop between them would leave no `target` at all
                publish_dir(staging, target, what)
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
