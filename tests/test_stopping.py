"""No start past the plan, and no stop that waits for ever: a CPU run whose plan exceeds the machine's free memory
is refused before any rank starts (as on a GPU), and a SIGTERM during a step that does not end (a machine that
swaps) stops the rank within a bound instead of waiting for the step."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from gptcli import planner
from gptcli.config import load_project
from gptcli.errors import GptError
from gptcli.train.launching import stopping

GIB = 2**30


def test_a_cpu_plan_far_past_free_memory_is_refused_before_any_rank_starts():
    """A CPU run whose own plan needed 686 GiB started on a 22.5 GiB machine; memory grew toward the kernel's
    kill. The plan is held against the machine's free memory, as on a GPU, with the same flag to go ahead."""
    from gptcli.train.command import check_fits

    overrides = ['model.preset="gpt2-xl"', "train.micro_batch_size=128", "train.seq_len=1024", 'train.device="cpu"',
                 "train.grad_accum_steps=1"]
    project = load_project(None, overrides)
    needed = planner.plan_run(project, device="cpu", ranks=1).memory.required  # the peak and its allowances
    assert needed > 600 * GIB
    with pytest.raises(GptError, match=f"This run needs about {planner.gib(needed)} per rank.* but 22.5 GiB is what "
                                       "this machine has free.*--set train.memory_check=false"):
        check_fits(project, nproc=1, available=int(22.5 * GIB))
    check_fits(load_project(None, [*overrides, "train.memory_check=false"]), nproc=1, available=int(22.5 * GIB))


class FakeTime:
    """A clock that moves only when slept on, and a step that ends at a chosen time (or never)."""

    def __init__(self, run, step_ends_at: float | None):
        self.now, self.run, self.ends = 0.0, run, step_ends_at
        self.exits: list[int] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.ends is not None and self.now >= self.ends:
            self.run.step += 1

    def deadline(self) -> stopping.StepDeadline:
        return stopping.StepDeadline(self.run, clock=self.clock, sleep=self.sleep, exit=self.exits.append)


def test_a_step_that_does_not_end_after_sigterm_is_abandoned_within_the_bound(capfd):
    """SIGTERM to a CPU run whose step swapped waited for a step that could not finish."""
    run = SimpleNamespace(step=4, slowest_step=2.0)
    time = FakeTime(run, step_ends_at=None)
    deadline = time.deadline()
    assert deadline.grace() == stopping.STOP_GRACE_SECONDS  # 3 × 2 s is less than the floor
    deadline.watch(signal.SIGTERM, run.step, deadline.grace())
    assert time.exits == [128 + signal.SIGTERM]
    assert time.now == pytest.approx(stopping.STOP_GRACE_SECONDS, abs=0.5)
    err = capfd.readouterr().err
    assert "Step 5 has not ended 10 s after SIGTERM (is the machine swapping?" in err
    assert "stopping without saving it: the last complete checkpoint is kept." in err


def test_a_step_that_ends_in_time_is_saved_as_usual():
    run = SimpleNamespace(step=4, slowest_step=20.0)
    time = FakeTime(run, step_ends_at=55.0)
    deadline = time.deadline()
    assert deadline.grace() == 60.0  # three of the slowest step so far
    deadline.watch(signal.SIGINT, 4, deadline.grace())
    assert time.exits == [] and run.step == 5


def test_the_deadline_starts_with_the_first_request_only(capfd):
    started = []
    answer = stopping.StopAcknowledger(SimpleNamespace(step=2), handler=None, clock=lambda: 0.0,
                                       deadline=SimpleNamespace(start=started.append))
    answer(signal.SIGTERM)
    answer(signal.SIGTERM)
    assert started == [signal.SIGTERM]
    assert capfd.readouterr().err.count("stopping after this step (step 3)") == 1
