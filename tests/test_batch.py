"""batch.batch_layout is the one rule for an optimizer step's batch: loading the project checks what holds for
any number of ranks, and the planner, the engine and a resume on other ranks lay the step out through it, so
the plan never describes a batch the engine would refuse or lay out otherwise."""

from __future__ import annotations

import pytest

from gptcli import planner
from gptcli.batch import BatchLayout, batch_layout
from gptcli.config import ConfigError, apply_overrides, project_from_dict
from gptcli.errors import GptError


def project(*overrides: str):
    return project_from_dict(apply_overrides({"model": {"preset": "nano"}}, list(overrides)))


@pytest.mark.parametrize("overrides, ranks", [
    ((), 1), ((), 3), (("train.grad_accum_steps=3", "train.micro_batch_size=2"), 2),
    (("train.global_batch_tokens=6144",), 3),  # 8 × 64 × 3 × 4
    (("train.global_batch_tokens=768", "train.micro_batch_size=4"), 6),  # a rank's share is 2: fewer than 4
    (("train.global_batch_tokens=4096", "train.micro_batch_size=4"), 3),  # 4096 is not a multiple of 768
])
def test_the_plan_lays_out_the_step_the_engine_runs_or_refuses_it_the_same_way(overrides, ranks):
    p = project(*overrides)
    try:
        layout = batch_layout(p.train, p.seq_len, ranks)
    except GptError as refused:
        with pytest.raises(GptError) as planned:
            planner.plan_run(p, device="cpu", ranks=ranks)
        assert str(planned.value) == str(refused)
        assert "is not a multiple of train.micro_batch_size × seq_len × ranks" in str(refused)
        return
    assert planner.plan_run(p, device="cpu", ranks=ranks).layout == layout
    assert layout.tokens_per_step == (p.train.global_batch_tokens or
                                      p.train.micro_batch_size * p.train.grad_accum_steps * ranks * p.seq_len)


def test_a_global_batch_that_no_number_of_ranks_fits_is_refused_at_loading():
    from gptcli.config import TrainConfig

    with pytest.raises(ConfigError) as loaded:
        project("train.global_batch_tokens=1000")
    with pytest.raises(GptError) as laid_out:  # the ranks unknown, as when the project is loaded
        batch_layout(TrainConfig(micro_batch_size=8, global_batch_tokens=1000), 64)
    assert str(loaded.value) == str(laid_out.value) == (
        "train.global_batch_tokens (1,000) is not a multiple of train.micro_batch_size × seq_len = 8 × 64 = 512.")


def test_a_step_in_other_micro_batches_keeps_its_sequences():
    layout = BatchLayout(micro_batch_size=8, grad_accum_steps=3, world_size=2, seq_len=64)
    assert layout.in_micro_batches(5) == BatchLayout(4, 6, 2, 64)  # the largest of at most 5 that divides 24
    assert layout.in_micro_batches(100) == BatchLayout(24, 1, 2, 64)
    assert layout.in_micro_batches(0) is None
    assert {layout.in_micro_batches(m).sequences_per_step for m in range(1, 30)} == {48}
