"""The exception types the command line turns into a single sentence on stderr: user errors, and stops by signal."""


class GptError(Exception):
    """A user-facing error: bad input, a missing file, a refused operation.

    The CLI prints ``str(error)`` as one sentence and exits with ``exit_code``;
    anything else that escapes is a bug and is reported as such.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class RankAgreedError(GptError):
    """A user error every rank of a run raises alike, because rank 0 decided it and told the others (the
    resume decision, the run dir's lock) or every rank reads it from the same checkpoint: rank 0 alone says it,
    the other ranks leave with its exit code in silence (train/launching/launch.quiet_exit_code)."""


class UsageError(GptError):
    """A command line that does not make sense (options that exclude each other, an unknown --device): exit
    code 2, as for an option the parser itself refuses. The one way gptcli raises a usage error, from the CLI
    or from the module a command calls."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class Stopped(BaseException):
    """The work was stopped by a signal (SIGTERM, or Ctrl-C's SIGINT) before it finished.

    A BaseException, like KeyboardInterrupt: cleanup that runs on every exception runs, `except Exception`
    blocks do not swallow it, and neither does the CLI framework (which turns a KeyboardInterrupt into a
    silent exit 130). The CLI prints `where` (what was left undone) and exits with 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT), as shells report a process ended by that signal."""

    def __init__(self, signal_number: int, where: str = ""):
        super().__init__(where)
        self.signal_number = signal_number
        self.where = where

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number
