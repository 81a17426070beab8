"""Library chatter goes to RUN/deepspeed.log, not between the user and `gpt train`'s own output.

DeepSpeed prints "... built successfully" on stdout when it starts its communication backend and logs
through its own stdout handler; torch.distributed raises FutureWarnings about its own collectives on
every ZeRO-3 step. None of it is for the user of a finished tool, all of it is useful when debugging,
so it is kept in a file in the run dir. Every rank appends to the same file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, TextIO

LOG_FILE = "deepspeed.log"
# Warnings raised from inside these packages are theirs to fix, not the user's.
LIBRARY_DIRS = (os.sep + os.path.join("torch", "distributed") + os.sep, os.sep + "deepspeed" + os.sep)


@contextlib.contextmanager
def library_output_to(run_dir: Path) -> Iterator[TextIO]:
    """While DeepSpeed starts: everything written to stdout and stderr into RUN/deepspeed.log. From then
    on, for the rest of the process: its logger and the warnings raised inside torch.distributed or
    DeepSpeed as well."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / LOG_FILE).open("a", buffering=1)
    route_deepspeed_logger(log)
    route_library_warnings(log)
    with output_redirected(log):
        yield log


@contextlib.contextmanager
def output_redirected(log: TextIO) -> Iterator[None]:
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
        for fd, copy in zip(descriptors, saved):
            os.dup2(copy, fd)
            os.close(copy)


def route_deepspeed_logger(log: TextIO) -> None:
    """DeepSpeed's logger writes to the stdout it saw at import; give it the log file instead."""
    logger = logging.getLogger("DeepSpeed")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(log)
    rank = os.environ.get("RANK", "0")
    handler.setFormatter(logging.Formatter(f"[%(asctime)s] [rank {rank}] [%(levelname)s] %(message)s"))
    logger.addHandler(handler)


def route_library_warnings(log: TextIO) -> None:
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
