"""SIGTERM/SIGINT during training: remembered, not obeyed at once. The loop finishes the step, every rank
learns of it through the step's all-reduce, they all save the same step, and the run exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Callable, Optional, Union

Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]


class StopRequest:
    """Remembers the first SIGTERM/SIGINT this process receives."""

    def __init__(self):
        self.signum = 0
        self.previous: dict[int, Handler] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Optional[FrameType]) -> None:
        from .phases import acknowledge_stop

        acknowledge_stop(self, signum)  # "stopping after this step…", unless the watcher thread said it
        self.signum = self.signum or signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
