"""Feedback while `gpt train` waits: one line per set-up phase as it starts, and an immediate answer to
Ctrl-C or SIGTERM.

Set-up can take minutes before the first step prints anything (DeepSpeed's import, a communication op
compiled on the first CPU run, torch.compile, loading a checkpoint), and a CPU step of a large model
lasts long enough that a stop request acknowledged only at the step's end looks ignored. Rank 0 speaks
for all ranks; the others stay quiet.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import time
from typing import Optional

# `gpt train` imports the training modules first thing, so this is close to when the command started.
STARTED = time.monotonic()
# A second Ctrl-C within this many seconds of the first is the same keypress delivered twice (once by the
# terminal to the whole process group, once forwarded by a launcher), not a second request.
REPEAT_SIGNAL_SECONDS = 1.0


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def show_phase(what: str, clock=time.monotonic) -> None:
    """Rank 0: `[  12.3s] what` on stderr, the seconds counted from the start of `gpt train`."""
    if is_rank_zero():
        print(f"[{clock() - STARTED:7.1f}s] {what}", file=sys.stderr, flush=True)


def deepspeed_phase(device: str) -> str:
    """The line for DeepSpeed's start, warning of the communication op a first CPU run compiles."""
    if device != "cpu":
        return "starting DeepSpeed (NCCL)"
    if cpu_comm_op_built() is False:
        return ("starting DeepSpeed (gloo); this first run on this machine compiles DeepSpeed's CPU "
                "communication op, about 90 s, once")
    return "starting DeepSpeed (gloo)"


def cpu_comm_op_built() -> Optional[bool]:
    """Whether DeepSpeed's shared-memory comm op is already in torch's extension cache (None: unknown)."""
    try:
        from torch.utils.cpp_extension import get_default_build_root
    except ImportError:
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    # torch keeps one cache per Python and build flavour: ROOT/py311_cpu/NAME/NAME.so (or ROOT/NAME/...).
    patterns = [os.path.join(root, f"{python}*", "deepspeed_shm_comm", "deepspeed_shm_comm*.so"),
                os.path.join(root, "deepspeed_shm_comm", "deepspeed_shm_comm*.so")]
    return any(glob.glob(pattern) for pattern in patterns)


def training_starts(run, stop) -> None:
    """Set-up is over: say which step comes first, and let the stop message name the step in progress."""
    stop.run = run
    total = run.project.train.max_steps
    show_phase(f"training: step {run.step + 1:,} of {total:,} is running (the live display follows it)")


def acknowledge_stop(request, signum: int, clock=time.monotonic) -> None:
    """Called from the SIGTERM/SIGINT handler before it records the request.

    The first request is answered at once (the loop finishes the step in progress, saves and exits).
    Another Ctrl-C after that aborts without saving: `latest` still names the last complete checkpoint.
    """
    if request.signum == 0:
        request.first_stop_at = clock()
        if is_rank_zero():
            write_stderr(stop_message(signum, getattr(request, "run", None)))
        return
    repeated = clock() - getattr(request, "first_stop_at", clock()) < REPEAT_SIGNAL_SECONDS
    if signum != signal.SIGINT or repeated:
        return
    if is_rank_zero():
        write_stderr("Aborting now, without saving; the last complete checkpoint is kept.\n")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def stop_message(signum: int, run) -> str:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    step = f" (step {run.step + 1:,})" if run is not None else ""
    again = "; press Ctrl-C again to abort without saving" if signum == signal.SIGINT else ""
    return f"\n{name}: stopping after this step{step}; saving a checkpoint…{again}\n"


def write_stderr(text: str) -> None:
    """Straight to file descriptor 2: a signal handler may interrupt a print to sys.stderr, and
    re-entering the buffered stream would raise."""
    os.write(2, text.encode())
