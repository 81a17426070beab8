"""The files gptcli reads and writes, two rules in one place.

Reading: a file a user names as an input (a project file, a hostfile, a text to score, task data, what
`gpt prepare` reads) is checked before a byte of it is read: it must be a regular file (a directory where
one is asked for) and, where the whole file is read into memory, no larger than a stated bound. A device
(/dev/zero, /dev/urandom), a FIFO (an open for reading blocks until a writer comes, for ever) or a file far
beyond what such an input holds is one sentence, not a hang or the kernel's out-of-memory kill.

Writing: a file gptcli writes in place inside its own dirs (a lock, metrics.jsonl, the library log, a
probe) is opened with O_NOFOLLOW, and a file it replaces (fsutil.atomic_path) must not be a link: a
symbolic link there is none of gptcli's making, and writing through it would overwrite, truncate or append
to whatever file of the user's it points at. It is refused in one sentence naming the link.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Optional

from .errors import GptError

MIB = 2**20


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO", "a character device")."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


# --- reading ------------------------------------------------------------------------------------------------------


def check_input(path: Path | str, what: str, *, limit: Optional[int] = None, directory: bool = False,
                fix: str = "") -> os.stat_result:
    """Refuse `path` as an input (`what` names it: "The hostfile") unless it is a regular file of at most
    `limit` bytes (a directory with `directory=True`); returns its stat. `fix` ends the sentence for a file
    too large ("give a smaller file")."""
    path = Path(path)
    try:
        info = os.stat(path)  # stat never blocks, even on a FIFO
    except FileNotFoundError:
        raise GptError(f"{what} {path} does not exist.") from None
    except NotADirectoryError:
        raise GptError(f"{what} {path} does not exist (a part of its path is a file).") from None
    except OSError as error:
        raise GptError(f"Cannot read {what.lower()} {path}: {error.strerror or error}.") from None
    wanted = stat.S_ISDIR if directory else stat.S_ISREG
    if not wanted(info.st_mode):
        expected = "a directory" if directory else "a regular file"
        raise GptError(f"{what} {path} is {kind_of(info.st_mode)}, not {expected}; gptcli reads only {expected} "
                       "there (a device or a FIFO would be read without end, or block for ever).")
    if limit is not None and info.st_size > limit:
        raise GptError(f"{what} {path} holds {info.st_size:,} bytes, more than the {size_text(limit)} such a file "
                       f"can be{'; ' + fix if fix else ''}.")
    return info


def size_text(count: int) -> str:
    return f"{count / MIB:,.0f} MiB" if count >= MIB else f"{count:,} bytes"


def read_input_bytes(path: Path | str, what: str, limit: int) -> bytes:
    """The bytes of an input file, checked first (check_input); never more than `limit` of them, even if
    it grew since (a file still being written)."""
    check_input(path, what, limit=limit)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise GptError(f"Cannot read {what.lower()} {path}: {error.strerror or error}.") from None
    if len(data) > limit:
        raise GptError(f"{what} {path} holds more than the {size_text(limit)} such a file can be.")
    return data


def read_input_text(path: Path | str, what: str, limit: int) -> str:
    """read_input_bytes as UTF-8 text."""
    try:
        return read_input_bytes(path, what, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise GptError(f"{what} {path} is not UTF-8 text.") from None


# --- writing ------------------------------------------------------------------------------------------------------


def link_refused(path: Path | str, instead: str = "remove the link") -> GptError:
    return GptError(f"{path} is a symbolic link, which gptcli did not make; it never writes through a link (the "
                    f"file it points at would be overwritten), so {instead} and run again.")


def refuse_link(path: Path | str, instead: str = "remove the link") -> None:
    """A file gptcli is about to replace or write must not be a symbolic link."""
    if os.path.islink(path):
        raise link_refused(path, instead)


def open_descriptor(path: Path | str, flags: int, mode: int = 0o666, instead: str = "remove the link") -> int:
    """os.open with O_NOFOLLOW: a link at `path` is refused in one sentence instead of followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise link_refused(path, instead) from None
        raise


def open_for_writing(path: Path | str, mode: str = "a", instead: str = "remove the link", **options) -> IO:
    """A text or binary file object of a file gptcli writes in place (`mode` "a", "w", "ab", "wb"), opened
    without following a link (open_descriptor). `options` are open()'s (encoding, buffering, newline)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    descriptor = open_descriptor(path, flags, instead=instead)
    try:
        return open(descriptor, mode, **options)
    except BaseException:
        os.close(descriptor)
        raise
