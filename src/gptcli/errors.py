"""The exception types the command line turns into a single sentence on stderr, and SIGTERM as one."""

import signal
from contextlib import contextmanager


class GptError(Exception):
    """A user-facing error: bad input, a missing file, a refused operation.

    The CLI prints ``str(error)`` as one sentence and exits with ``exit_code``;
    anything else that escapes is a bug and is reported as such.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(GptError):
    """Work stopped by Ctrl-C (exit 130) or SIGTERM (exit 143); the message says where, and what was kept."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM inside `sigterm_as_interrupt`: unwinds (and cleans up) like Ctrl-C, but carries exit code 143."""

    exit_code = 143


@contextmanager
def sigterm_as_interrupt():
    """`kill PID` cleans up like Ctrl-C does (signals can only be set in the main thread; elsewhere a no-op)."""

    def interrupt(signum, frame):
        raise Interrupted("terminated")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
