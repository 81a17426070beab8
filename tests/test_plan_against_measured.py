"""The plan follows the run, and stands beside what the run measured.

The code path planned is the project's (a CPU project on the CPU, the precision asked for, the micro batch
given before the batch rule); the allowances say which are assumed; `gpt train` records its peak memory and
speed (metrics.jsonl, RUN/measured.json); `gpt inspect-params --project P` shows the plan beside them with
their ratio, and plans a later run at the measured speed. On the CPU the measured peak resident memory of
nano and tiny runs is within 25% of the plan (slow: real runs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import USERS_ALLOCATOR, run_gpt
from gptcli import machine, planner
from gptcli.config import apply_overrides, dump_toml, project_from_dict
from gptcli.errors import GptError
from gptcli.inspect import PlanRequest, inspect_command
from gptcli.planner.measured import Measurement, read_measurement, write_measurement
from shard_fixture import make_shards

GIB = 2**30
CPU_RATE = 1e11  # FLOP/s a matmul "measures" here, so that CPU plans are the same on any machine


@pytest.fixture(autouse=True)
def steady_cpu(monkeypatch):
    monkeypatch.setattr(machine, "measure_cpu_flops", lambda: CPU_RATE)


def project_toml(directory: Path, *overrides: str, data: Path | None = None) -> Path:
    """A project file whose run dir is directory/run, with `--set`-style overrides."""
    raw = apply_overrides({"project": {"out_dir": str(directory / "run")}, "data": {"dir": str(data or directory)}},
                          list(overrides))
    path = directory / "run.toml"
    path.write_text(dump_toml(project_from_dict(raw)))
    return path


NANO_CPU = ('model.preset="nano"', 'train.device="cpu"', "train.max_steps=3", "train.eval_every=0",
            "train.sample_every=0")


def measurement_of(plan: planner.RunPlan, fingerprint: str, **values) -> Measurement:
    """What a run of exactly `plan` could have measured."""
    layout = plan.layout
    return Measurement(device=plan.training.device, ranks=plan.training.ranks, precision=plan.training.precision,
                       zero_stage=plan.training.zero_stage, micro_batch=layout.micro_batch_size,
                       grad_accum_steps=layout.grad_accum_steps, seq_len=layout.seq_len,
                       activation_checkpointing=plan.memory.checkpointing, model_fingerprint=fingerprint, steps=5,
                       flops_per_token=plan.flops_per_token, **values)


# --- the plan follows the run -------------------------------------------------------------------------------------


def test_a_cpu_project_is_planned_on_the_cpu_path(tmp_path):
    project = project_toml(tmp_path, *NANO_CPU, "model.dropout=0.1")
    plan = inspect_command(None, project, []).plan
    assert plan.training.device == "cpu" and plan.training.precision == "fp32" and plan.gpu is None
    assert plan.attention_kernel == "math"  # the CPU's flash kernel takes no dropout
    assert list(plan.memory.allowances) == ["the process (Python, torch, DeepSpeed, the data loader)"]
    assert plan.memory.allowances["the process (Python, torch, DeepSpeed, the data loader)"].assumed is False
    assert plan.rate == pytest.approx(CPU_RATE * planner.CPU_TRAINING_EFFICIENCY) and plan.mfu is None
    assert plan.rate_source == "measured on this CPU"
    gpu_plan = inspect_command(None, project, ['train.device="cuda"']).plan
    assert gpu_plan.training.device == "cuda" and gpu_plan.attention_kernel == "flash"  # bf16 on CUDA takes dropout
    fp32 = inspect_command(None, project, ['train.device="cuda"'], request=PlanRequest(precision="fp32")).plan
    assert fp32.attention_kernel == "efficient"  # flash wants 16 bits
    with pytest.raises(GptError, match='this project trains on the CPU'):
        inspect_command(None, project, [], request=PlanRequest(gpu="H100"))


def test_micro_batch_is_set_before_the_batch_rule_is_checked():
    """A step of 60 sequences of 1,024 tokens is not a multiple of the project's micro batch of 8, but is of 6."""
    step = ["train.global_batch_tokens=61440", "train.micro_batch_size=8"]
    with pytest.raises(GptError, match="not a multiple of train.micro_batch_size × seq_len = 8 × 1024"):
        inspect_command("gpt2", None, step)
    plan = inspect_command("gpt2", None, step, request=PlanRequest(micro_batch="6", gpu="L4")).plan
    assert (plan.layout.micro_batch_size, plan.layout.grad_accum_steps) == (6, 10)
    auto = inspect_command("gpt2", None, step, request=PlanRequest(micro_batch="auto", gpu="L4")).plan
    assert 60 % auto.layout.micro_batch_size == 0 and auto.fits
    with pytest.raises(GptError, match="--micro-batch 7|micro_batch_size × seq_len = 7"):
        inspect_command("gpt2", None, step, request=PlanRequest(micro_batch="7", gpu="L4"))


def test_the_allowances_say_what_is_assumed():
    """NCCL's buffers on several GPUs only, with NVLink SHARP's on HGX Hopper beyond two; the CUDA context by
    generation; ZeRO-0's fused step in 16 bits; every GPU allowance assumed."""
    project = project_from_dict(apply_overrides({}, ["model.preset=gpt2"]))

    def allowances(gpu: str, ranks: int, *overrides: str) -> dict:
        p = project_from_dict(apply_overrides({}, ["model.preset=gpt2", *overrides]))
        return planner.plan_run(p, gpu=planner.find_gpu(gpu), ranks=ranks).memory.allowances

    nccl = "NCCL buffers (2 communicators)"
    assert nccl not in allowances("H100", 1)
    assert allowances("H100", 8)[nccl].size - allowances("A100-80GB", 8)[nccl].size == 2 * 288 * 2**20
    assert allowances("H100", 2)[nccl].size == allowances("A100-80GB", 2)[nccl].size == 2 * 688 * 2**20
    assert allowances("V100-32GB", 1)["CUDA context"].size < allowances("H100", 1)["CUDA context"].size
    fused = "ZeRO-0's fp32 gradient copies (DeepSpeed's fused step)"
    assert fused in allowances("V100-32GB", 8, "model.preset=gpt2-xl", "deepspeed.zero_stage=0",
                               "train.precision=fp16", "train.micro_batch_size=1")
    assert fused not in allowances("H100", 1, "deepspeed.zero_stage=1")
    assert all(a.assumed for a in allowances("H100", 8).values())
    context_counted = planner.plan_run(project, gpu=planner.find_gpu("H100"), context_counted=True)
    assert "CUDA context" not in context_counted.memory.allowances  # pre-flight: free memory has it taken


# --- plan against measured ----------------------------------------------------------------------------------------


def test_a_measurement_is_compared_only_with_the_run_it_was_made_of(tmp_path):
    project = project_from_dict(apply_overrides({}, [*NANO_CPU, f'project.out_dir="{tmp_path / "run"}"']))
    plan = planner.plan_run(project, device="cpu", cpu_flops=CPU_RATE)
    measured = measurement_of(plan, project.model.fingerprint(), tokens_per_s=2000.0, peak_rss=int(1.1 * GIB))
    write_measurement(tmp_path / "run", measured)
    assert read_measurement(tmp_path / "run") == measured
    against = planner.plan_against_measured(project, device="cpu", cpu_flops=CPU_RATE)
    assert against.differences == []
    memory, step = against.comparisons
    assert (memory.planned, memory.measured) == (plan.memory.required, int(1.1 * GIB))
    assert memory.ratio == pytest.approx(1.1 * GIB / plan.memory.required)
    assert step.measured == pytest.approx(plan.tokens_per_step / 2000.0) and step.planned == plan.step_seconds
    # A later plan of the project runs at the measured speed.
    assert against.plan.rate == pytest.approx(measured.flops_per_token * 2000.0)
    assert against.plan.rate_source == "measured by this project's last run"
    other = dataclasses.replace(project, train=dataclasses.replace(project.train, micro_batch_size=4))
    changed = planner.plan_against_measured(other, device="cpu", cpu_flops=CPU_RATE)
    assert changed.comparisons == [] and changed.differences[0].startswith("micro_batch 8, planned 4")
    assert changed.plan.rate_source == "measured on this CPU"


def test_a_gpu_measurement_sets_the_mfu_of_the_same_gpus_plan_only(tmp_path):
    project = project_from_dict(apply_overrides({}, ["model.preset=gpt2", f'project.out_dir="{tmp_path / "run"}"']))
    h100 = planner.find_gpu("H100")
    plan = planner.plan_run(project, gpu=h100, capacity=h100.memory)
    tokens_per_s = 0.5 * 989e12 / plan.flops_per_token  # a run at 50% MFU
    write_measurement(tmp_path / "run", measurement_of(plan, project.model.fingerprint(), tokens_per_s=tokens_per_s,
                                                       device_name="NVIDIA H100 80GB HBM3", peak_allocated=GIB))
    later = planner.plan_against_measured(project, gpu=h100, capacity=h100.memory)
    assert later.plan.mfu == pytest.approx(0.5) and later.estimate.mfu == 0.3
    assert [row.what for row in later.comparisons][0] == "tensors at the peak (max_memory_allocated)"
    assert planner.plan_against_measured(project, gpu=h100, capacity=h100.memory, mfu=0.4).plan.mfu == 0.4
    a100 = planner.find_gpu("A100-80GB")
    elsewhere = planner.plan_against_measured(project, gpu=a100, capacity=a100.memory)
    assert elsewhere.differences == ["measured on NVIDIA H100 80GB HBM3, planned for A100-80GB"]
    assert elsewhere.plan.mfu == elsewhere.estimate.mfu


def test_inspect_params_shows_the_plan_beside_the_measurement(tmp_path):
    from typer.testing import CliRunner

    from gptcli.cli import app

    project_file = project_toml(tmp_path, *NANO_CPU)
    plan = inspect_command(None, project_file, []).plan
    project = project_from_dict(apply_overrides({}, [*NANO_CPU]))
    write_measurement(tmp_path / "run", measurement_of(plan, project.model.fingerprint(), tokens_per_s=1000.0,
                                                       peak_rss=plan.memory.required * 2))
    shown = CliRunner().invoke(app, ["inspect-params", "--project", str(project_file)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "plan against the last run (5 steps measured)" in text and "measured / planned" in text
    assert "peak resident memory per rank (VmHWM)" in text and "2.00" in text
    assert "+ the process (Python, torch, DeepSpeed, the data loader) (measured)" in text
    report = json.loads(CliRunner().invoke(app, ["inspect-params", "--project", str(project_file), "--json"]).stdout)
    rows = {row["what"]: row for row in report["measured"]["comparisons"]}
    assert rows["peak resident memory per rank (VmHWM)"]["ratio"] == pytest.approx(2.0)
    assert report["plan"]["device"] == "cpu" and report["plan"]["time"]["rate_source"] == \
        "measured by this project's last run"


def test_a_rank_reads_its_own_peak_memory():
    from gptcli.train.observing import measure

    peak = measure.resident_peak()
    assert peak is not None and 50 * 2**20 < peak < 64 * GIB  # this test process: torch is imported
    assert measure.memory_record("cpu")["memory_peak"] >= peak
    assert measure.median_after_warmup([100.0, 10.0, 12.0, 11.0]) == 11.0  # the first step left out


# --- real runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus):
    return make_shards(corpus, tmp_path_factory.mktemp("shards"))


def trained(directory: Path, shards: Path, *overrides: str) -> Path:
    project = project_toml(directory, *overrides, data=shards)
    result = run_gpt("train", "--project", project, env=USERS_ALLOCATOR)  # its memory, as users run it
    assert result.returncode == 0, result.stderr[-3000:]
    return project


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory, shards):
    return trained(tmp_path_factory.mktemp("nano"), shards, *NANO_CPU)


def resident_ratio(project: Path) -> float:
    """measured / planned peak resident memory, as `gpt inspect-params --project P` compares them."""
    against = inspect_command(None, project, []).against
    assert against is not None and against.differences == []
    rows = {row.what: row for row in against.comparisons}
    return rows["peak resident memory per rank (VmHWM)"].ratio


@pytest.mark.slow
def test_a_cpu_run_records_its_peak_memory_and_speed(nano_run):
    run_dir = nano_run.parent / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["memory_peak"] > 100 * 2**20 for r in records)
    measured = read_measurement(run_dir)
    assert measured is not None and measured.device == "cpu" and measured.steps == 2
    assert measured.peak_rss >= max(r["memory_peak"] for r in records) and measured.tokens_per_s > 0
    from typer.testing import CliRunner

    from gptcli.cli import app

    shown = CliRunner().invoke(app, ["inspect-params", "--project", str(nano_run)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "plan against the last run (2 steps measured)" in shown.stdout and "measured / planned" in shown.stdout


@pytest.mark.slow
def test_the_peak_resident_memory_of_a_nano_run_is_within_25_percent_of_the_plan(nano_run):
    assert resident_ratio(nano_run) == pytest.approx(1.0, abs=0.25)  # measured 0.93 (docs/benchmarks.md)


@pytest.mark.slow
def test_the_peak_resident_memory_of_a_tiny_run_is_within_25_percent_of_the_plan(tmp_path, shards):
    project = trained(tmp_path, shards, 'model.preset="tiny"', 'train.device="cpu"', "train.max_steps=2",
                      "train.eval_every=0", "train.sample_every=0")
    assert resident_ratio(project) == pytest.approx(1.0, abs=0.25)  # measured 1.02 (docs/benchmarks.md)


@pytest.mark.gpu
def test_a_gpu_run_allocates_what_the_plan_says(tmp_path, shards):
    """GPT-2 124M for 4 steps on one GPU: max_memory_allocated within 10% of the plan's peak, and the time per
    step measured (the figure docs/planning.md leaves for a GPU machine)."""
    project = trained(tmp_path, shards, 'model.preset="gpt2"', 'train.device="cuda"', "train.max_steps=4",
                      "train.micro_batch_size=8", "train.eval_every=0", "train.sample_every=0", "train.compile=false")
    report = json.loads(run_gpt("inspect-params", "--project", project, "--json").stdout)
    assert report["measured"]["differences"] == []
    rows = {row["what"]: row for row in report["measured"]["comparisons"]}
    assert rows["tensors at the peak (max_memory_allocated)"]["ratio"] == pytest.approx(1.0, abs=0.10)
    assert rows["seconds per step"]["measured"] > 0
