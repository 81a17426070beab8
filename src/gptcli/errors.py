"""The one exception type the command line turns into a single sentence on stderr."""


class GptError(Exception):
    """A user-facing error: bad input, a missing file, a refused operation.

    The CLI prints ``str(error)`` as one sentence and exits with ``exit_code``;
    anything else that escapes is a bug and is reported as such.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (exit 130) or SIGTERM (exit 143): the CLI prints the message, which may say where the work
    stopped, and exits with `exit_code`."""

    def __init__(self, message: str = "interrupted", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
