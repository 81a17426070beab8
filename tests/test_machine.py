"""Sizes a user types are bounded by what the machine holds: one sentence before anything that large is
allocated, never the kernel's out-of-memory kill (exit 137, no message)."""

from __future__ import annotations

import pytest

from conftest import assert_user_error, run_gpt
from gptcli import machine
from gptcli.config import load_project
from gptcli.errors import GptError


def test_available_memory_is_known_on_linux():
    free = machine.available_memory()
    assert free is None or 0 < free < 2**50


def test_the_parameter_floor_never_exceeds_the_real_count():
    from gptcli.inspect import inspect_parameters

    for preset in ("nano", "gpt2", "openai-gpt"):
        config = load_project(None, [f'model.preset="{preset}"']).model
        assert machine.parameter_floor(config) <= inspect_parameters(config).total
        assert machine.parameter_floor(config) > 0.9 * inspect_parameters(config).total  # and is close to it


@pytest.mark.parametrize("overrides, fragment", [
    (["model.block_size=1000000000", "train.seq_len=32"], "at least 64,003,"),  # 1e9 positions × 64 wide
    (["model.block_size=100000", "train.micro_batch_size=100000"], "micro_batch_size 100000 × seq_len 100,000"),
])
def test_a_model_or_batch_that_cannot_fit_is_refused_before_anything_is_built(monkeypatch, overrides, fragment):
    """`--set model.block_size=1000000000` allocated 256 GB before failing."""
    monkeypatch.setattr(machine, "available_memory", lambda device="cpu": 16 * 2**30)
    project = load_project(None, ['model.preset="nano"', *overrides])
    with pytest.raises(GptError) as refused:
        machine.check_training_fits(project, local_ranks=1, device="cpu")
    assert fragment in str(refused.value) and "more than the 16.0 GiB this machine has free" in str(refused.value)
    machine.check_training_fits(load_project(None, ['model.preset="nano"']), local_ranks=2, device="cpu")  # fits


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_gpt_train_refuses_it_in_one_sentence(tmp_path):
    result = run_gpt("train", "--set", 'model.preset="nano"', "--set", "model.block_size=1000000000",
                     "--set", f'project.out_dir="{tmp_path / "run"}"', "--set", "train.device=\"cpu\"", cwd=tmp_path)
    assert_user_error(result, "Training this model (at least", "of memory, more than the", "model.block_size")
    assert not (tmp_path / "run").exists() and "internal error" not in result.stderr
