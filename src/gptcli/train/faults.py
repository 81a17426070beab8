"""Faults injected by tests through GPTCLI_FAULT, so that what a crash, a kill or a divergence does to a
run can be checked without waiting for one.

The variable holds comma-separated `kind@step`, or `kind@step@rank` to restrict it to one rank:
    nan            the loss of that step is NaN (the run must stop before the optimizer step)
    inf_grad       the loss of that step is finite but its gradients are infinite
    kill           SIGKILL this rank after that step
    crash_in_save  die inside the save of that step, after DeepSpeed's files, before `latest`
    sigterm        SIGTERM to this rank during that step
    stall          that step never ends (as one that swaps): a stop request must not wait for it
    tracker        every tracker raises when given that step's record (each must cost a warning, not the run)
    kill_in_convert  SIGKILL this rank in the middle of converting the checkpoint of that step for another
                   number of ranks (reshard.py), after DeepSpeed's converter wrote its files, before they count
"""

from __future__ import annotations

import os
import signal
import time

import torch


class Faults:
    def __init__(self, spec: str, rank: int):
        self.faults: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split("@")
            if len(parts) == 3 and int(parts[2]) != rank:
                continue
            self.faults.add((parts[0], int(parts[1])))

    @classmethod
    def from_environment(cls, rank: int) -> "Faults":
        return cls(os.environ.get("GPTCLI_FAULT", ""), rank)

    def has(self, kind: str, step: int) -> bool:
        return (kind, step) in self.faults

    def maybe_crash_in_save(self, step: int) -> None:
        if self.has("crash_in_save", step):
            os._exit(70)

    def maybe_kill(self, step: int) -> None:
        if self.has("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_kill_in_convert(self, step: int) -> None:
        if self.has("kill_in_convert", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_sigterm(self, step: int) -> None:
        if self.has("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)

    def maybe_stall(self, step: int) -> None:
        while self.has("stall", step):
            time.sleep(3600)

    def tracker(self, tracker):
        """`tracker`, raising at the steps of the `tracker` faults."""
        steps = {step for kind, step in self.faults if kind == "tracker"}
        return FailingTracker(tracker, steps) if steps else tracker


class FailingTracker:
    def __init__(self, tracker, steps: set[int]):
        self.tracker, self.steps = tracker, steps

    def log(self, step: int, metrics: dict) -> None:
        if step in self.steps:
            raise RuntimeError(f"injected failure at step {step}")
        self.tracker.log(step, metrics)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; backward multiplies the incoming gradient by infinity."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def corrupt(loss: torch.Tensor, faults: Faults, step: int) -> torch.Tensor:
    """The loss of micro step of optimizer step `step`, with the faults of that step applied."""
    if faults.has("nan", step):
        loss = loss * float("nan")
    if faults.has("inf_grad", step):
        loss = InfiniteGradient.apply(loss)
    return loss
