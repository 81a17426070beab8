"""`gpt train`'s command (gptcli.train.command): what it suggests next, and that a configuration error or a
run that cannot fit this machine stops it before any rank, launcher or DeepSpeed is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_user_error, run_gpt
from gptcli import planner
from gptcli.config import load_project, project_from_dict
from gptcli.errors import GptError
from gptcli.train.command import TrainRequest, check_fits, next_commands

GIB = 2**30


def test_next_commands_carry_the_project_and_where_the_run_and_data_are_but_not_training_settings():
    request = TrainRequest(Path("books.toml"), ['data.dir="shards"', "train.max_steps=20",
                                                'project.out_dir="runs/a b"'])
    generate, evaluate = next_commands(request, project_from_dict({"generate": {"prompt": "Once upon"}}))
    assert generate == "gpt generate 'Once upon' --project books.toml '--set=data.dir=\"shards\"' " \
                       "'--set=project.out_dir=\"runs/a b\"'"
    assert evaluate == "gpt eval --project books.toml '--set=data.dir=\"shards\"' '--set=project.out_dir=\"runs/a b\"'"
    assert next_commands(TrainRequest(None, []), project_from_dict({}))[1] == "gpt eval"


def test_a_configuration_error_stops_train_before_anything_starts(tmp_path):
    result = run_gpt("train", "--nproc", "2", "--set", "train.beta1=1.5", cwd=tmp_path)
    assert_user_error(result, "train.beta1 must be in [0, 1), not 1.5")
    assert "loading DeepSpeed" not in result.stderr and list(tmp_path.iterdir()) == []


def test_train_refuses_bidirectional_attention_before_anything_starts(tmp_path):
    """Next-token pretraining with a non-causal pattern would let each position see its own target: the leak
    check (leaks.py) refuses it before any rank starts."""
    result = run_gpt("train", "--nproc", "2", "--set", 'model.attention="bidirectional"', cwd=tmp_path)
    assert_user_error(result, 'train.objective "next_token" does not fit model.attention "bidirectional"',
                      "the prediction at position 0 of the token at position 1 depends on the token at position 1, "
                      "its own target")
    assert result.returncode == 1 and "internal error" not in result.stderr
    assert "loading DeepSpeed" not in result.stderr and list(tmp_path.iterdir()) == []
    # the model and gpt eval keep it: the project itself loads
    assert project_from_dict({"model": {"attention": "bidirectional"}}).model.attention == "bidirectional"


def cpu_project(*overrides: str):
    return load_project(None, ['model.preset="nano"', 'train.device="cpu"', *overrides])


@pytest.mark.parametrize("overrides, largest", [
    (["model.block_size=1000000000", "train.seq_len=32"], "optimizer states"),  # 1e9 positions × 64 wide
    (["model.block_size=100000", "train.micro_batch_size=100000"], "activations"),  # 1e10 tokens per micro batch
])
def test_a_cpu_run_that_cannot_fit_is_refused_by_the_plan_before_any_rank_starts(overrides, largest):
    """`--set model.block_size=1000000000` allocated 256 GB before failing; the planner's peak per rank says so
    first, with the change that would fit, and train.memory_check = false goes ahead."""
    project = cpu_project(*overrides)
    with pytest.raises(GptError) as refused:
        check_fits(project, nproc=2, available=16 * GIB)
    message = " ".join(str(refused.value).split())
    needed = planner.plan_run(project, device="cpu", ranks=2).memory.required  # tensors and the process
    assert f"This run needs about {planner.gib(needed)} per rank" in message and largest in message
    assert "but 8.0 GiB is each of 2 ranks' share of the 16.0 GiB this machine has free" in message
    assert "fewer ranks, a shorter train.seq_len or a smaller model" in message and "--set train.memory_check=false" in message
    check_fits(cpu_project(*overrides, "train.memory_check=false"), nproc=2, available=16 * GIB)  # goes ahead


def test_the_cpu_check_counts_what_a_rank_really_holds_so_the_small_presets_fit_a_small_machine():
    """DeepSpeed's reduce bucket is 1.9 GiB of fp32 whatever the model, but a rank writes only as much of it as
    its gradients fill: counted whole, nano's two ranks would need 4.6 GiB and be refused on a 2 GiB machine
    where they train in about 1.9 GiB of resident memory (measured: 0.94 GiB per rank, the process included)."""
    for preset in ("nano", "tiny"):
        project = cpu_project(f'model.preset="{preset}"')
        peak = planner.plan_run(project, device="cpu", ranks=1).memory.peak
        assert peak < 1.8 * GIB  # the tensors; measured with the process: nano 0.94 GiB, tiny 2.4 GiB at their peak
    check_fits(cpu_project(), nproc=2, available=2 * GIB)
    needed = planner.plan_run(cpu_project(), device="cpu", ranks=2).memory.required
    with pytest.raises(GptError, match="micro_batch_size = 4 with train.grad_accum_steps = 2"):
        check_fits(cpu_project(), nproc=2, available=2 * (needed - 2**20))  # half the batch, twice: the same step


def test_a_gpu_run_is_left_to_each_ranks_preflight(monkeypatch):
    from gptcli.train import engine

    monkeypatch.setattr(engine, "device_type", lambda project: "cuda")
    check_fits(cpu_project("model.block_size=1000000000", "train.seq_len=32"), nproc=1, available=GIB)


@pytest.mark.slow  # starts `gpt` in a process of its own
def test_gpt_train_refuses_it_in_one_sentence(tmp_path):
    result = run_gpt("train", "--set", 'model.preset="nano"', "--set", "model.block_size=1000000000",
                     "--set", f'project.out_dir="{tmp_path / "run"}"', "--set", "train.device=\"cpu\"", cwd=tmp_path)
    assert_user_error(result, "This run needs about", "per rank", "this machine has free", "a smaller model")
    assert not (tmp_path / "run").exists() and "internal error" not in result.stderr
    assert "loading DeepSpeed" not in result.stderr
