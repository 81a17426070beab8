"""`gpt train` on one CUDA GPU: bf16 learns and resumes bit for bit after kill -9, the consolidated model
is DeepSpeed's fp32 master copy under bf16 and fp16, and `compile` trains. Skipped without CUDA (conftest);
the CPU versions of these checks are in test_train.py."""

from __future__ import annotations

import pytest

from conftest import losses, project_file, train
from masters import assert_model_dir_holds_the_masters

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ON_GPU = ('train.device="cuda"',)


def test_bf16_on_one_gpu_learns_and_resumes_bit_for_bit_after_kill_9(tmp_path, shards):
    settings = (*ON_GPU, 'train.precision="bf16"', "deepspeed.zero_stage=1", "train.max_steps=12")
    whole = train(project_file(tmp_path, shards, *settings, name="whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert losses(tmp_path / "whole")[-1] < losses(tmp_path / "whole")[0] - 0.5
    project = project_file(tmp_path, shards, *settings, name="killed")
    assert train(project, fault="kill@7").returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert_model_dir_holds_the_masters(tmp_path / "whole", "bf16")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_consolidated_model_is_the_fp32_master_copy_on_a_gpu(tmp_path, shards, precision, stage):
    project = project_file(tmp_path, shards, *ON_GPU, f'train.precision="{precision}"', f"deepspeed.zero_stage={stage}",
                           "train.max_steps=3", "train.eval_every=0")
    result = train(project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_model_dir_holds_the_masters(tmp_path / "run", precision)


def test_compile_on_trains_and_learns(tmp_path, shards):
    project = project_file(tmp_path, shards, *ON_GPU, "train.compile=true", "train.max_steps=12",
                           "train.eval_every=0")
    result = train(project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0] - 0.5
