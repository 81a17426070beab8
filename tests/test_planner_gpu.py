"""The plan's peak memory against torch.cuda.max_memory_allocated on a GPU (marked gpu: skipped without CUDA).

Each configuration runs in its own process through bench/plan_memory.py (DeepSpeed's engine as `gpt train`
builds it, two optimizer steps). torch.compile is off where the peak is compared: the planner counts what
eager PyTorch keeps; a compiled model keeps at most that (its partitioner recomputes cheap activations), which
the compiled case checks as an upper bound.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

EAGER = "train.compile=false train.seq_len=1024"
CONFIGS = [
    f"model.preset=gpt2 train.micro_batch_size=8 deepspeed.zero_stage=1 {EAGER}",
    f"model.preset=gpt2 train.micro_batch_size=16 deepspeed.zero_stage=2 train.grad_accum_steps=2 {EAGER}",
    f"model.preset=gpt2 train.micro_batch_size=8 train.activation_checkpointing=true deepspeed.zero_stage=1 {EAGER}",
    f"model.preset=gpt2-medium train.micro_batch_size=4 model.dropout=0.1 deepspeed.zero_stage=0 {EAGER}",
    f"model.preset=nano train.micro_batch_size=64 deepspeed.zero_stage=3 {EAGER}",
]


def measure(config: str, cap: int = 0) -> dict:
    import shlex
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from plan_memory import run_one

    return run_one(shlex.split(config), "cuda", cap)


@pytest.mark.parametrize("config", CONFIGS)
def test_the_plans_peak_is_what_the_gpu_allocates(config):
    row = measure(config)
    measured = max(row["measured"].values())
    assert row["planned_peak"] == pytest.approx(measured, rel=0.10), row


def test_a_compiled_model_allocates_at_most_the_plan():
    row = measure("model.preset=gpt2 train.micro_batch_size=8 train.compile=true train.seq_len=1024")
    assert max(row["measured"].values()) <= row["planned_peak"] * 1.10, row


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    """On a GPU capped at 12 GiB (set_per_process_memory_fraction: the same test on any GPU with more), the
    planner's largest micro batch for GPT-2 124M trains, and one more needs more than the cap once the
    plan's allowance for workspaces and fragmentation is added to what it really allocates."""
    from gptcli import planner
    from gptcli.config import apply_overrides, project_from_dict

    cap = 12 * 2**30
    base = ["model.preset=gpt2", "deepspeed.zero_stage=1", "train.grad_accum_steps=2", *EAGER.split()]
    project = project_from_dict(apply_overrides({}, base))
    training = planner.training_for(project, "cuda", 1, "bf16")
    largest = planner.largest_micro_batch(training, cap, False, context_counted=True)  # accumulating
    assert largest > 0
    fits = measure(" ".join([*base, f"train.micro_batch_size={largest}"]), cap)
    assert not fits.get("out_of_memory"), fits
    one_more = measure(" ".join([*base, f"train.micro_batch_size={largest + 1}"]))
    allocated = max(one_more["measured"].values())
    needed = allocated + planner.WORKSPACE_BYTES + planner.FRAGMENTATION * allocated
    assert needed > cap, (largest, allocated)
