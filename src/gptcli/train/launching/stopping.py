"""Stopping a run by signal, in one place: the request, its immediate answer, and the launcher's part.

In a rank, SIGTERM/SIGINT are remembered, not obeyed at once (StopRequest): the loop finishes the step,
every rank learns of it through the step's all-reduce, they all save the same step, and the run exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT). Once set-up is over, rank 0 also answers each
request as it arrives (StopAcknowledger), from a watcher thread while the main thread is inside a long C
call, because a CPU step of a large model lasts long enough that an answer at the step's end looks like
none; a second Ctrl-C aborts without saving. A step that does not end within a bound after the request
(StepDeadline: a machine that swaps, a step that cannot finish) is abandoned: the rank exits without
saving it, and the last complete checkpoint stays in charge.

In the launcher of `--nproc` ranks, a signal that arrives before torch's elastic agent has installed its
own handlers ends the launch the way it does once the agent runs (end_launch_on_signal).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Callable, Optional, Union

from ..observing.phases import is_rank_zero

Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]

# Set by `gpt train --nproc`'s launcher in its ranks: a file that exists once a rank has failed and the
# launcher is stopping the others (launch.failures_marked); their SIGTERM then needs no answer of their own.
PEER_FAILED_VARIABLE = "GPTCLI_PEER_FAILED_FILE"

# A second Ctrl-C within this many seconds of the first is the same keypress delivered twice (once by the
# terminal to the whole process group, once forwarded by a launcher), not a second request.
REPEAT_SIGNAL_SECONDS = 1.0
# How long the step in progress may go on after a stop request: STOP_GRACE_STEPS times the slowest step of this
# run, and at least STOP_GRACE_SECONDS (the first step has no measure yet). A step past it is not going to end:
# a CPU run whose memory is swapping (its plan exceeded the machine's) took hours a step, and a SIGTERM waited
# for it. Abandoning a step loses that step only.
STOP_GRACE_SECONDS = 10.0
STOP_GRACE_STEPS = 3


class StopRequest:
    """Remembers the first SIGTERM/SIGINT this process receives, and answers each once training runs."""

    def __init__(self):
        self.signum = 0
        self.previous: dict[int, Handler] = {}
        self.acknowledger: Optional[StopAcknowledger] = None  # set by answer_during

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.acknowledger is not None and not self.acknowledger.watching:
            self.acknowledger(signum)  # "stopping after this step…" (a watcher thread, when there is one, says it)
        self.signum = self.signum or signum

    def answer_during(self, run) -> None:
        """Set-up is over: from now on each request is answered at once, naming `run`'s step in progress, and
        the step in progress must end within StepDeadline's bound."""
        self.acknowledger = StopAcknowledger(run, self.handle, deadline=StepDeadline(run))
        self.acknowledger.watch()

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class StopAcknowledger:
    """Answers SIGINT/SIGTERM as they arrive. The first: the loop finishes the step in progress, saves and
    exits. Another Ctrl-C after that aborts without saving (`latest` still names the last complete
    checkpoint)."""

    def __init__(self, run, handler, clock=time.monotonic, deadline: Optional["StepDeadline"] = None):
        self.run = run
        self.handler = handler  # the stop request's handler: answer only while it is the one installed
        self.clock = clock
        self.deadline = deadline
        self.first_at: Optional[float] = None
        self.watching = False

    def __call__(self, signum: int) -> None:
        if self.first_at is None:
            self.first_at = self.clock()
            if is_rank_zero() and not peer_failed():
                write_stderr(stop_message(signum, self.run))
            if self.deadline is not None:
                self.deadline.start(signum)
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


class StepDeadline:
    """After a stop request, the step in progress of `run` (its `step`: the steps done, and `slowest_step`: the
    longest one's seconds) must end within `grace()`; one that does not is abandoned: the rank exits with
    128 + the signal number without saving it (`exit`: os._exit, as nothing of the step may be written)."""

    POLL_SECONDS = 0.2

    def __init__(self, run, clock=time.monotonic, sleep=time.sleep, exit=os._exit):
        self.run, self.clock, self.sleep, self.exit = run, clock, sleep, exit

    def grace(self) -> float:
        return max(STOP_GRACE_SECONDS, STOP_GRACE_STEPS * getattr(self.run, "slowest_step", 0.0))

    def start(self, signum: int) -> None:
        threading.Thread(target=self.watch, args=(signum, self.run.step, self.grace()), name="step-deadline",
                         daemon=True).start()

    def watch(self, signum: int, step: int, grace: float) -> None:
        """Until the step after `step` ends, at most `grace` seconds; then give up on it."""
        deadline = self.clock() + grace
        while self.run.step == step and self.clock() < deadline:
            self.sleep(self.POLL_SECONDS)
        if self.run.step != step:
            return  # it ended: the loop saves it and exits
        if is_rank_zero():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            write_stderr(f"Step {step + 1:,} has not ended {grace:.0f} s after {name} (is the machine swapping? its "
                         "memory may be too small for this run); stopping without saving it: the last complete "
                         "checkpoint is kept.\n")
        self.exit(128 + signum)


def peer_failed() -> bool:
    """Whether this rank's launcher is stopping it because another rank failed (it reports that itself)."""
    marker = os.environ.get(PEER_FAILED_VARIABLE)
    return bool(marker and os.path.exists(marker))


def stop_message(signum: int, run) -> str:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    step = f" (step {run.step + 1:,})" if run is not None else ""
    again = "; press Ctrl-C again to abort without saving" if signum == signal.SIGINT else ""
    return f"\n{name}: stopping after this step{step}; saving a checkpoint…{again}\n"


def write_stderr(text: str) -> None:
    """Straight to file descriptor 2: a signal handler may interrupt a print to sys.stderr (re-entering
    the buffered stream would raise), and the watcher thread must not wait for the main thread's lock."""
    os.write(2, text.encode())


# --- the launcher ------------------------------------------------------------------------------------------


def end_launch_on_signal() -> None:
    """Until torch's elastic agent installs its own handlers (when it starts the ranks), SIGTERM/SIGINT end
    the launch as the agent's would, with its SignalException, instead of killing this process with its
    ranks half started."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, raise_signal_exception)


def raise_signal_exception(signum, frame) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))
