"""Library chatter goes to RUN/deepspeed.log, not between the user and `gpt train`'s own output.

DeepSpeed prints "... built successfully" on stdout when it starts its communication backend and logs
through its own stdout handler; torch.distributed raises FutureWarnings about its own collectives on
every ZeRO-3 step; torch's extension builder warns "No CUDA runtime is found" on every rank of a machine
with CUDA's toolkit and no GPU; MLflow logs its INFO lines (and SQLAlchemy's retries) to stderr. None of it
is for the user of a finished tool, all of it is useful when debugging, so it is kept in a file in the run
dir. Every rank appends to the same file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import IO, Iterator, Optional, TextIO

from ...paths import open_for_writing
from ...rundir import LIBRARY_LOG

# Warnings raised from inside these packages are theirs to fix, not the user's.
LIBRARY_DIRS = (os.sep + os.path.join("torch", "distributed") + os.sep, os.sep + "deepspeed" + os.sep)
# The loggers whose records go to the log. A library that sets up its own handler when it is imported (DeepSpeed,
# MLflow) is routed again after that import: route_library_loggers.
LIBRARY_LOGGERS = ("DeepSpeed", "torch.utils.cpp_extension", "mlflow", "alembic", "sqlalchemy", "huey", "wandb")

_active: "Optional[LibraryLog]" = None  # this process's library log, once there is one


class LibraryLog:
    """This process's library output. It is held in a temporary file until the run dir is known to be this
    run's (`settle`: the lock is taken, the dir is shared, the resume decided), then appended to
    RUN/deepspeed.log, so a refused run writes nothing into a dir that is not its own. From creation on, for
    the rest of the process, DeepSpeed's logger and the warnings raised inside torch.distributed or
    DeepSpeed go here; `capture()` adds everything written to stdout and stderr while DeepSpeed starts."""

    def __init__(self):
        global _active
        self.stream: IO[str] = tempfile.TemporaryFile("w+", buffering=1, encoding="utf-8", errors="replace")
        self.pending = True
        self.handler = logging.StreamHandler(self)
        rank = os.environ.get("RANK", "0")
        self.handler.setFormatter(logging.Formatter(f"[%(asctime)s] [rank {rank}] [%(name)s %(levelname)s] %(message)s"))
        self.route_loggers()
        route_library_warnings(self)
        _active = self

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def capture(self) -> contextlib.AbstractContextManager:
        self.route_loggers()  # what the libraries imported since set up for themselves
        return output_redirected(self)

    def route_loggers(self) -> None:
        """LIBRARY_LOGGERS into this log instead of the terminal: their stream handlers (the ones the libraries
        add on import) replaced by this log's, and nothing passed on to the root logger. Safe to repeat."""
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                        and handler is not self.handler:
                    logger.removeHandler(handler)
            if self.handler not in logger.handlers:
                logger.addHandler(self.handler)
            logger.propagate = False

    def settle(self, run_dir: Path) -> None:
        """From now on into RUN/deepspeed.log, starting with what was held back."""
        if not self.pending:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open_for_writing(run_dir / LIBRARY_LOG, "a", buffering=1, encoding="utf-8", errors="replace")
        self.stream.flush()
        self.stream.seek(0)
        log.write(self.stream.read())
        self.stream.close()
        self.stream, self.pending = log, False


@contextlib.contextmanager
def library_output_to(run_dir: Path) -> Iterator[LibraryLog]:
    """Library output straight into RUN/deepspeed.log, stdout and stderr included while the block runs."""
    log = LibraryLog()
    log.settle(run_dir)
    with log.capture():
        yield log


@contextlib.contextmanager
def output_redirected(log: "TextIO | LibraryLog") -> Iterator[None]:
    """sys.stdout/sys.stderr, and file descriptors 1 and 2 as well: the compilers and ninja that DeepSpeed
    runs to build and probe its ops write to the descriptors."""
    descriptors = (1, 2)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in descriptors]
    try:
        for fd in descriptors:
            os.dup2(log.fileno(), fd)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(descriptors, saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def route_library_loggers() -> None:
    """After importing a library that sets up its own logging (MLflow): its records into this process's
    library log, when there is one (trackers call this; a process without a run has none)."""
    if _active is not None:
        _active.route_loggers()


def route_library_warnings(log: "TextIO | LibraryLog") -> None:
    """Warnings whose source file lies in torch.distributed or DeepSpeed go to the log; others as before."""
    shown_before = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if is_library_file(filename):
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            shown_before(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def is_library_file(filename: str) -> bool:
    return any(part in filename for part in LIBRARY_DIRS)
