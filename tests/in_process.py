"""`gpt ARGV` answered in the test's own process: for refusals that never reach DeepSpeed, a few hundred
milliseconds instead of a fresh interpreter's seconds."""

from __future__ import annotations

import re
import signal
import sys


def gpt(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """`gpt ARGV` as cli.main answers it: (exit code, stderr then stdout in one line, a usage error's box
    undrawn). sys.argv is set through `monkeypatch`; cli.main's own SIGTERM handler is put back after."""
    from gptcli import cli

    monkeypatch.setattr(sys, "argv", ["gpt", *argv])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        cli.main()
        code = 0
    except SystemExit as exit:  # sys.exit(None) is 0, sys.exit("a message") is 1
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        signal.signal(signal.SIGTERM, handler)
    said = capsys.readouterr()
    return code, " ".join(re.sub("[│╭╮╰╯─]", " ", said.err + said.out).split())
