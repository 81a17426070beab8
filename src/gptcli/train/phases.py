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
import threading
import time
from typing import Optional

# `gpt train` imports the training modules right after reading the project: the clock of the phase lines.
STARTED = time.monotonic()
# A second Ctrl-C within this many seconds of the first is the same keypress delivered twice (once by the
# terminal to the whole process group, once forwarded by a launcher), not a second request.
REPEAT_SIGNAL_SECONDS = 1.0


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
    if cpu_comm_op_built() is False:
        return ("starting DeepSpeed (gloo); this first run on this machine compiles DeepSpeed's CPU "
                "communication op, about 45 s on 2 free cores, once")
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
    """Set-up is over: say which step comes first, and answer stop requests from now on."""
    stop.acknowledger = StopAcknowledger(run, stop.handle)
    stop.acknowledger.watch()
    total = run.project.train.max_steps
    show_phase(f"training: step {run.step + 1:,} of {total:,} is running (the live display follows it)")


def acknowledge_stop(request, signum: int) -> None:
    """From the stop request's SIGTERM/SIGINT handler: answer there, unless a watcher thread already has."""
    acknowledger = getattr(request, "acknowledger", None)
    if acknowledger is not None and not acknowledger.watching:
        acknowledger(signum)


class StopAcknowledger:
    """Answers SIGINT/SIGTERM as they arrive. The first: the loop finishes the step in progress, saves and
    exits. Another Ctrl-C after that aborts without saving (`latest` still names the last complete
    checkpoint)."""

    def __init__(self, run, handler, clock=time.monotonic):
        self.run = run
        self.handler = handler  # the stop request's handler: answer only while it is the one installed
        self.clock = clock
        self.first_at: Optional[float] = None
        self.watching = False

    def __call__(self, signum: int) -> None:
        if self.first_at is None:
            self.first_at = self.clock()
            if is_rank_zero():
                write_stderr(stop_message(signum, self.run))
            return
        if signum != signal.SIGINT or self.clock() - self.first_at < REPEAT_SIGNAL_SECONDS:
            return
        if is_rank_zero():
            write_stderr("Aborting now, without saving; the last complete checkpoint is kept.\n")
        os._exit(128 + signal.SIGINT)

    def watch(self) -> None:
        """Python runs a signal handler only between bytecodes of the main thread, which can spend most
        of a step inside one C call (a CPU backward pass). The C-level handler writes the signal number
        to the wakeup fd at once; a thread blocked on reading it answers."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the handler answers, at the main thread's next bytecode
            os.close(read_fd)
            os.close(write_fd)
            return
        self.watching = True
        threading.Thread(target=self.read_signals, args=(read_fd,), name="stop-acknowledger", daemon=True).start()

    def read_signals(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in (signal.SIGINT, signal.SIGTERM) and signal.getsignal(signum) == self.handler:
                    self(signum)


def stop_message(signum: int, run) -> str:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    step = f" (step {run.step + 1:,})" if run is not None else ""
    again = "; press Ctrl-C again to abort without saving" if signum == signal.SIGINT else ""
    return f"\n{name}: stopping after this step{step}; saving a checkpoint…{again}\n"


def write_stderr(text: str) -> None:
    """Straight to file descriptor 2: a signal handler may interrupt a print to sys.stderr (re-entering
    the buffered stream would raise), and the watcher thread must not wait for the main thread's lock."""
    os.write(2, text.encode())
