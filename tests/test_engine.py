"""The engine's choices that only show on a GPU, checked where they are made: DeepSpeed's config, the
optimizer, compile, the vocabulary padding, the MFU peak table, and the batches read ahead."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gptcli.batch import batch_layout
from gptcli.config import project_from_dict
from gptcli.optimizers import fused_adam_prebuilt
from gptcli.train.engine import (
    compile_enabled,
    deepspeed_config,
    loop_clips_gradients,
    make_optimizer,
    precision_note,
    training_model_config,
)
from gptcli.train.observing.metrics import peak_flops, peak_for_name


def project(**sections):
    return project_from_dict(sections)


def test_deepspeeds_throughput_timer_is_off_unless_the_passthrough_asks():
    p = project()
    layout = batch_layout(p.train, p.seq_len, 1)
    assert deepspeed_config(p, layout, "fp32")["timers"] == {"throughput": {"enabled": False}}
    asked = project(deepspeed={"config": {"timers": {"throughput": {"enabled": True}}}})
    timers = deepspeed_config(asked, batch_layout(asked.train, asked.seq_len, 1), "fp32")["timers"]
    assert timers["throughput"]["enabled"] is True


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32_where_deepspeed_can(stage):
    p = project(deepspeed={"zero_stage": stage})
    config = deepspeed_config(p, batch_layout(p.train, p.seq_len, 1), "bf16")
    if stage == 0:  # DeepSpeed refuses grad_accum_dtype at stage 0; the run says so and steers to ZeRO-1
        assert "data_types" not in config and "zero_stage = 1" in precision_note(p, "bf16")
    else:
        assert config["data_types"] == {"grad_accum_dtype": "fp32"} and precision_note(p, "bf16") is None
    assert "data_types" not in deepspeed_config(p, batch_layout(p.train, p.seq_len, 1), "fp32")


def test_only_fp32_zero0_is_clipped_by_the_loop_and_deepspeed_then_does_not_clip():
    clipped = project(train={"grad_clip": 0.5}, deepspeed={"zero_stage": 0})
    assert loop_clips_gradients(clipped, "fp32") and not loop_clips_gradients(clipped, "bf16")
    layout = batch_layout(clipped.train, clipped.seq_len, 1)
    assert deepspeed_config(clipped, layout, "fp32")["gradient_clipping"] == 0.0
    assert deepspeed_config(clipped, layout, "bf16")["gradient_clipping"] == 0.5
    stage1 = project(train={"grad_clip": 0.5}, deepspeed={"zero_stage": 1})
    assert not loop_clips_gradients(stage1, "fp32")
    assert deepspeed_config(stage1, batch_layout(stage1.train, stage1.seq_len, 1), "fp32")["gradient_clipping"] == 0.5


def test_compile_auto_means_cuda_and_a_bool_in_the_file_still_works():
    assert project().train.compile == "auto"
    assert compile_enabled(project(), "cuda") and not compile_enabled(project(), "cpu")
    assert compile_enabled(project(train={"compile": True}), "cpu")
    assert not compile_enabled(project(train={"compile": False}), "cuda")
    with pytest.raises(Exception, match='train.compile must be one of "auto", true, false, not "sometimes"'):
        project(train={"compile": "sometimes"})


def test_gpt2_presets_pad_the_vocabulary_on_a_gpu_only():
    gpt2 = project(model={"preset": "gpt2"})
    padded = training_model_config(gpt2, "cuda")
    assert padded.padded_vocab_size == 50304 and padded.vocab_size == 50257
    assert training_model_config(gpt2, "cpu").padded_vocab_size == 50257
    assert training_model_config(project(model={"preset": "nano"}), "cuda").padded_vocab_size == 50257
    chosen = project(model={"preset": "gpt2", "vocab_multiple": 64})
    assert training_model_config(chosen, "cuda").vocab_multiple == 64  # a multiple the user chose stays


@pytest.mark.slow
def test_no_fusedadam_jit_build_here_and_the_cpu_optimizer_is_torchs():
    from gptcli.model import build_model

    assert fused_adam_prebuilt() is False  # this DeepSpeed was installed without DS_BUILD_FUSED_ADAM
    p = project(model={"preset": "nano"})
    optimizer = make_optimizer(build_model(p.model), p, "cpu")
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["foreach"] is False


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H800", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L40S", 362),
    ("NVIDIA B200", 2250), ("NVIDIA GH200 480GB", 989), ("NVIDIA GeForce GTX 1080", None)])
def test_the_mfu_peak_is_looked_up_by_device_name(name, tflops):
    assert peak_for_name(name) == (tflops * 1e12 if tflops else None)


def test_peak_tflops_overrides_the_lookup_and_a_cpu_has_none():
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", 123.5) == 123.5e12
    with pytest.raises(Exception, match="train.peak_tflops"):
        project(train={"peak_tflops": -1.0})


IMPORT_CHECK = """
import sys
from gptcli.train.launching.importing import import_deepspeed
deepspeed = import_deepspeed()
from deepspeed.autotuning import autotuner
assert "mlflow" not in sys.modules, "DeepSpeed's import imported MLflow"
assert autotuner.has_mlflow is False
import mlflow  # gptcli's tracker imports it as usual afterwards
assert mlflow.__name__ == "mlflow" and import_deepspeed() is deepspeed
print("ok")
"""


def test_deepspeeds_import_leaves_mlflow_out_and_importable():
    """DeepSpeed's autotuner imports MLflow at DeepSpeed's import (about 2 s per process): import_deepspeed
    hides it for that import only. In a fresh process, as each rank starts."""
    pytest.importorskip("mlflow")
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


MUON_CHECK = """
import sys
from gptcli.train.launching.importing import import_deepspeed, import_muon_uncompiled
import_deepspeed()  # as a rank imports it
from deepspeed.runtime import compiler
compile_before = compiler.compile
if sys.argv[1] == "muon-first":  # a Muon run built its optimizer on DeepSpeed's Muon before
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
import_muon_uncompiled()
from deepspeed.runtime.zero.muon import original_muon
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
assert compiler.compile is compile_before
compiled = [hasattr(getattr(original_muon, name), "_torchdynamo_orig_callable")
            for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz", "muon_update")]
print(compiled, "torch._inductor.compile_fx" in sys.modules)
"""


@pytest.mark.slow
@pytest.mark.parametrize("first,compiled", [("adamw", False), ("muon-first", True)])
def test_deepspeeds_muon_module_is_loaded_uncompiled_unless_a_muon_optimizer_loaded_it(first, compiled):
    """ZeRO imports DeepSpeed's Muon module whatever the optimizer; its kernels' torch.compile loads inductor
    (about a second of each rank's start). A run on another optimizer loads it with plain kernels; a Muon run
    keeps the compiled ones. In a fresh process, as each rank starts."""
    result = subprocess.run([sys.executable, "-c", MUON_CHECK, first], capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == f"{[compiled] * 3} {compiled}"
