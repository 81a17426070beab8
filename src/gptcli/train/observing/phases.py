"""Feedback while `gpt train` sets up: one line per set-up phase as it starts.

Set-up can take minutes before the first step prints anything (DeepSpeed's import, a communication op
compiled on the first CPU run, torch.compile, loading a checkpoint). Rank 0 speaks for all ranks; the
others stay quiet. (The answer to Ctrl-C or SIGTERM is stopping.py's.)
"""

from __future__ import annotations

import os
import sys
import time

from ..launching.opbuild import build_time, op_is_built

# `gpt train` imports the training modules right after reading the project: the clock of the phase lines.
STARTED = time.monotonic()


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def show_phase(what: str, clock=time.monotonic) -> None:
    """Rank 0: `[  12.3s] what` on stderr, the seconds counted from STARTED."""
    if is_rank_zero():
        print(f"[{clock() - STARTED:7.1f}s] {what}", file=sys.stderr, flush=True)


def deepspeed_phase(device: str) -> str:
    """The line for DeepSpeed's start, warning of the communication op a first CPU run compiles."""
    if device != "cpu":
        return "starting DeepSpeed (NCCL)"
    if op_is_built() is False:
        return ("starting DeepSpeed (gloo); this first run in this Python environment compiles DeepSpeed's CPU "
                f"communication op, {build_time()}, once")
    return "starting DeepSpeed (gloo)"


def training_starts(run, stop) -> None:
    """Set-up is over: stop requests are answered from now on (stopping.StopRequest), and the line says
    which step comes first."""
    stop.answer_during(run)
    total = run.project.train.max_steps
    show_phase(f"training: step {run.step + 1:,} of {total:,} is running (the live display follows it)")
