"""What `gpt train` says before it starts: the plan, the estimate, and the advice for hours on a CPU.

No timed assertions: every estimate here runs on an injected rate."""

from __future__ import annotations

import io

import pytest

from gptcli.config import apply_overrides, project_from_dict
from gptcli.train import preflight
from gptcli.train.engine import batch_layout

NANO_RUN = ["model.preset=nano", "train.max_steps=10", "train.micro_batch_size=4", "train.grad_accum_steps=3",
            "train.eval_every=4", "train.eval_batches=2"]


def project(overrides: list[str], source: str | None = "run.toml"):
    return project_from_dict(apply_overrides({}, overrides), source=source)


def announced(proj, device: str = "cpu", rate: float = 1e11) -> str:
    stream = io.StringIO()
    preflight.announce(proj, device, "never", measure_cpu=lambda: rate, stream=stream)
    return stream.getvalue()


@pytest.fixture(autouse=True)
def rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_plan_counts_the_runs_tokens_and_flops():
    proj = project(NANO_RUN)
    layout = batch_layout(proj, 2)
    plan = preflight.plan_for(proj, "cpu", "fp32", 2, layout.sequences_per_step, layout.seq_len)
    assert (plan.model_name, plan.parameters, plan.seq_len) == ("nano", 3_320_640, 64)
    assert plan.tokens_per_step == 4 * 3 * 2 * 64
    assert plan.total_tokens == 10 * 4 * 3 * 2 * 64
    # evaluations at steps 4, 8 and the last: 3 × 2 micro batches × 4 sequences × 64 tokens × 2 ranks,
    # forward only (a third of the training FLOPs per token)
    assert plan.eval_tokens == 3 * 2 * 4 * 64 * 2
    assert plan.total_flops == pytest.approx(plan.flops_per_token * (plan.total_tokens + plan.eval_tokens / 3))
    assert plan.flops_per_token == 19_997_568  # what `gpt inspect-params nano` reports


def test_a_token_budget_shortens_the_planned_steps():
    proj = project([*NANO_RUN, "train.max_steps=1000", f"train.max_tokens={5 * 768 + 1}"])
    layout = batch_layout(proj, 1)
    plan = preflight.plan_for(proj, "cpu", "fp32", 1, layout.sequences_per_step, layout.seq_len)
    assert plan.steps == 6  # the step that crosses the budget is the last


def test_a_resumed_run_plans_the_steps_left(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "client_state.json").write_text('{"step": 4}')
    (checkpoint.parent / "latest").write_text("step_00000004")
    proj = project([*NANO_RUN, f'project.out_dir="{tmp_path / "run"}"'])
    layout = batch_layout(proj, 1)
    plan = preflight.plan_for(proj, "cpu", "fp32", 1, layout.sequences_per_step, layout.seq_len,
                              resume=preflight.resume_point(proj, "auto"))
    assert (plan.steps_done, plan.steps, plan.total_tokens) == (4, 6, 6 * 768)
    assert plan.eval_tokens == 2 * 2 * 4 * 64  # at steps 8 and 10
    assert "6 steps (steps 5-10, resuming from step_00000004) = 4,608 tokens" in "\n".join(
        preflight.describe(proj, plan, 1e12))
    assert preflight.resume_point(proj, "never") is None


def test_the_message_names_model_device_precision_zero_ranks_tokens_and_the_estimate():
    proj = project([*NANO_RUN, "deepspeed.zero_stage=2"])
    layout = batch_layout(proj, 1)
    plan = preflight.plan_for(proj, "cpu", "fp32", 1, layout.sequences_per_step, layout.seq_len)
    rate = plan.total_flops / (13 * 60)  # 13 minutes exactly
    text = "\n".join(preflight.describe(proj, plan, rate))
    for fragment in ("model nano", "3,320,640 parameters", "on the CPU", "fp32", "ZeRO stage 2", "1 rank",
                     "768 tokens per step", "10 steps", "7,680 tokens", "estimate: about 13 minutes",
                     "live ETA"):
        assert fragment in text, (fragment, text)
    assert "no run.toml" not in text and "hours" not in text


@pytest.mark.parametrize("matmul_rate, preset", [(1e11, "tiny"), (1e10, "nano"), (1e9, "nano")])
def test_hours_on_a_cpu_name_the_largest_small_preset_that_fits(matmul_rate, preset):
    """The built-in defaults (GPT-2 124M, 1000 steps) on a slow CPU; the preset named is the largest one
    whose run fits in an hour at that rate (nano when none does, with fewer steps as well)."""
    text = announced(project([], source=None), rate=matmul_rate)
    assert "no run.toml: using the built-in defaults, GPT-2 124M" in text
    assert "That is hours on a CPU." in text
    assert f"The {preset} preset" in text
    assert f"`gpt train --set model.preset={preset}`" in text and f"`gpt init --preset {preset}`" in text
    fits = 1000 * 8 * {"tiny": 256, "nano": 64}[preset] * {"tiny": 44_930_304, "nano": 19_997_568}[preset] \
        / (matmul_rate * preflight.CPU_TRAINING_EFFICIENCY) < 3600
    assert ("Fewer steps fit too" in text) == (not fits)


def test_a_small_model_that_still_takes_hours_gets_fewer_steps():
    text = announced(project(["model.preset=nano", "train.max_steps=100000"]), rate=1e10)
    assert "That is hours on a CPU." in text and "preset" not in text.split("hours on a CPU.")[1]
    steps = int(text.split("--set train.max_steps=")[1].split("`")[0])
    assert 0 < steps < 100_000


def test_a_run_that_fits_gets_no_advice():
    text = announced(project(NANO_RUN), rate=1e11)
    assert "estimate: under a minute" in text and "hours" not in text and "preset=" not in text


def test_the_model_is_named_by_a_preset_only_when_it_has_that_shape():
    assert preflight.model_name(project(["model.preset=nano"]).model) == "nano"
    assert preflight.model_name(project(["model.preset=nano", "model.n_layer=3"]).model) == "custom (changed from nano)"
    assert preflight.model_name(project([]).model) == "custom (the shape of gpt2)"
    assert preflight.model_name(project(["model.n_embd=96", "model.n_head=4"]).model) == "custom"
    assert preflight.model_name(project(["model.preset=nano", "model.vocab_size=40478"]).model) == \
        "custom (changed from nano)"


def test_gpu_estimates_use_the_peak_times_a_typical_mfu(monkeypatch):
    from gptcli.train import metrics

    monkeypatch.setattr(metrics, "peak_flops", lambda device: 989e12)
    assert preflight.achievable_flops("cuda", "bf16", 8) == pytest.approx(989e12 * preflight.GPU_TYPICAL_MFU * 8)
    assert preflight.achievable_flops("cuda", "fp32", 1) == pytest.approx(989e12 * preflight.GPU_TYPICAL_MFU / 16)
    monkeypatch.setattr(metrics, "peak_flops", lambda device: None)
    assert preflight.achievable_flops("cuda", "bf16", 1) is None
    proj = project(["model.preset=gpt2"])
    plan = preflight.plan_for(proj, "cuda", "bf16", 8, 64, 1024)
    text = "\n".join(preflight.describe(proj, plan, None))
    assert "on GPUs" in text and "8 ranks" in text and "estimate: none for this GPU" in text


def test_only_rank_zero_announces(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert announced(project(NANO_RUN)) == ""


def test_the_cpu_rate_is_measured_by_a_short_matmul(monkeypatch):
    """Square matmuls until `seconds` have passed, 2·size³ FLOPs each, over the time they took. A clock that
    reads 0.01 s later at each look makes the count exact: the warm-up call is not timed, and the loop stops
    at the first look at or past 0.05 s, after 5 timed matmuls."""
    ticks = iter(range(1000))
    monkeypatch.setattr(preflight.time, "perf_counter", lambda: next(ticks) * 0.01)
    rate = preflight.measure_cpu_flops(seconds=0.05, size=128)
    assert rate == pytest.approx(2 * 128**3 * 5 / 0.05, rel=1e-9)


@pytest.mark.parametrize("seconds, text", [(30, "under a minute"), (61, "about 1 minute"), (89 * 60, "about 89 minutes"),
                                           (2 * 3600, "about 2.0 hours"), (35 * 3600, "about 35 hours"),
                                           (100 * 3600, "about 4 days")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert preflight.human_duration(seconds) == text
