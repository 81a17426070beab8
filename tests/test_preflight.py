"""What `gpt train` checks and says before anything slow: the plan, the estimate, the advice for hours on a
CPU, and each problem found before DeepSpeed starts (a finished run, another model in the run dir, a missing
tracker package, too little data, a run that will not fit the GPU).

No timed assertions: every estimate here runs on an injected rate, and the machine is injected too."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import assert_user_error, run_gpt
from gptcli import machine, planner
from gptcli.batch import batch_layout
from gptcli.config import apply_overrides, project_from_dict
from gptcli.errors import GptError
from gptcli.planner.plan import UNKNOWN_GPU_MFU
from gptcli.train import preflight
from shard_fixture import write_shard_dir

NANO_RUN = ["model.preset=nano", "train.max_steps=10", "train.micro_batch_size=4", "train.grad_accum_steps=3",
            "train.eval_every=4", "train.eval_batches=2"]


def project(overrides: list[str], source: str | None = "run.toml"):
    return project_from_dict(apply_overrides({}, overrides), source=source)


def cpu(rate: float = 1e11, ranks: int = 1) -> preflight.Machine:
    return preflight.Machine(device="cpu", ranks=ranks, precision="fp32", cpu_flops=rate)


def announced(proj, rate: float = 1e11) -> str:
    """The lines rank 0 prints, for a CPU measured at `rate` (the checks of the data are tested below)."""
    machine = cpu(rate)
    plan = preflight.plan_on(proj, machine, None)
    small = {name: preflight.plan_on(proj, machine, None, model=planner.preset_model(name, proj.model.vocab_size))
             for name in preflight.SMALL_PRESETS}
    return "\n".join(preflight.describe(proj, plan, small))


@pytest.fixture(autouse=True)
def rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_plan_counts_the_runs_tokens_and_flops():
    proj = project(NANO_RUN)
    plan = preflight.plan_on(proj, cpu(ranks=2), None)
    assert (plan.model_name, plan.parameters, plan.layout.seq_len) == ("nano", 3_320_640, 64)
    assert plan.tokens_per_step == 4 * 3 * 2 * 64 == batch_layout(proj.train, proj.seq_len, 2).tokens_per_step
    assert plan.total_tokens == 10 * 4 * 3 * 2 * 64
    # evaluations at steps 4, 8 and the last: 3 × 2 micro batches × 4 sequences × 64 tokens × 2 ranks,
    # forward only (a third of the training FLOPs per token)
    assert plan.eval_tokens == 3 * 2 * 4 * 64 * 2
    assert plan.total_flops == pytest.approx(plan.flops_per_token * (plan.total_tokens + plan.eval_tokens / 3))
    assert plan.flops_per_token == 19_997_568  # what `gpt inspect-params nano` reports
    assert plan.rate == pytest.approx(1e11 * planner.CPU_TRAINING_EFFICIENCY * 2)


def test_a_token_budget_shortens_the_planned_steps():
    proj = project([*NANO_RUN, "train.max_steps=1000", f"train.max_tokens={5 * 768 + 1}"])
    assert preflight.plan_on(proj, cpu(), None).steps == 6  # the step that crosses the budget is the last


def fake_checkpoint(run_dir: Path, step: int, proj=None, tokens: int = 0) -> None:
    """A checkpoint dir as resuming sees it (saved before manifests existed: its client state is enough)."""
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    checkpoint.mkdir(parents=True)
    client = {"step": step, "tokens": tokens}
    if proj is not None:
        client["architecture"] = proj.model.architecture_dict()
    (checkpoint / "client_state.json").write_text(json.dumps(client))
    (checkpoint.parent / "latest").write_text(checkpoint.name)


def test_a_resumed_run_plans_the_steps_left(tmp_path):
    proj = project([*NANO_RUN, f'project.out_dir="{tmp_path / "run"}"'])
    fake_checkpoint(tmp_path / "run", 4)
    point = preflight.resume_point(proj, "auto")
    plan = preflight.plan_on(proj, cpu(), point)
    assert (plan.steps_done, plan.steps, plan.total_tokens) == (4, 6, 6 * 768)
    assert plan.eval_tokens == 2 * 2 * 4 * 64  # at steps 8 and 10
    assert "6 steps (steps 5-10, resuming from step_00000004) = 4,608 tokens" in "\n".join(
        preflight.describe(proj, plan))
    assert preflight.resume_point(proj, "never") is None


def test_the_message_names_model_device_precision_zero_ranks_tokens_memory_and_the_estimate():
    proj = project([*NANO_RUN, "deepspeed.zero_stage=2"])
    plan = preflight.plan_on(proj, cpu(), None)
    rate = plan.total_flops / (13 * 60 - plan.startup_seconds) / (planner.CPU_TRAINING_EFFICIENCY)
    text = "\n".join(preflight.describe(proj, preflight.plan_on(proj, cpu(rate), None)))
    for fragment in ("model nano", "3,320,640 parameters", "on the CPU", "fp32", "ZeRO stage 2", "1 rank",
                     "768 tokens per step", "10 steps", "7,680 tokens", "memory per rank:",
                     "allowance: the process (Python, torch, DeepSpeed, the data loader)",
                     "estimate: about 13 minutes", "start-up: DeepSpeed", "live ETA"):
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
        / (matmul_rate * planner.CPU_TRAINING_EFFICIENCY) < 3600
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
    assert planner.model_name(project(["model.preset=nano"]).model) == "nano"
    assert planner.model_name(project(["model.preset=nano", "model.n_layer=3"]).model) == "custom (changed from nano)"
    assert planner.model_name(project([]).model) == "custom (the shape of gpt2)"
    assert planner.model_name(project(["model.n_embd=96", "model.n_head=4"]).model) == "custom"
    assert planner.model_name(project(["model.preset=nano", "model.vocab_size=40478"]).model) == \
        "custom (changed from nano)"


def gpu(free: float = 80 * 2**30, peak: float | None = None, ranks: int = 1, precision: str = "bf16",
        name: str | None = "H100") -> preflight.Machine:
    return preflight.Machine(device="cuda", ranks=ranks, precision=precision, free_memory=int(free),
                             device_label="free on cuda:0", gpu=planner.find_gpu(name) if name else None,
                             peak_flops=peak)


def test_gpu_estimates_use_the_peak_at_the_runs_precision_times_the_mfu_of_its_generation():
    proj = project(["model.preset=gpt2"])
    h100 = planner.find_gpu("H100")
    mfu, _ = planner.mfu_for(h100, "bf16", 124_439_808)
    assert preflight.plan_on(proj, gpu(ranks=8), None).rate == pytest.approx(989e12 * mfu * 8)
    fp32 = preflight.plan_on(proj, gpu(precision="fp32"), None).rate
    assert fp32 == pytest.approx(495e12 * mfu)  # TF32 tensor cores: half the bf16 peak, the same fraction of it
    unknown = preflight.plan_on(proj, gpu(name=None, peak=300e12), None).rate  # [train] peak_tflops-style
    assert unknown == pytest.approx(300e12 * UNKNOWN_GPU_MFU)
    plan = preflight.plan_on(proj, gpu(name=None, ranks=8), None)
    text = "\n".join(preflight.describe(proj, plan))
    assert "on GPUs" in text and "8 ranks" in text and "estimate: none for this GPU" in text
    assert "memory per GPU:" in text and "free on cuda:0: fits" in text
    assert "torch.compile ~60 s" in "\n".join(preflight.describe(proj, preflight.plan_on(proj, gpu(), None)))


def test_the_cpu_rate_is_measured_by_a_short_matmul(monkeypatch):
    """Square matmuls until `seconds` have passed, 2·size³ FLOPs each, over the time they took. A clock that
    reads 0.01 s later at each look makes the count exact: the warm-up call is not timed, and the loop stops
    at the first look at or past 0.05 s, after 5 timed matmuls."""
    ticks = iter(range(1000))
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks) * 0.01)
    rate = preflight.measure_cpu_flops(seconds=0.05, size=128)
    assert rate == pytest.approx(2 * 128**3 * 5 / 0.05, rel=1e-9)


@pytest.mark.parametrize("seconds, text", [(30, "under a minute"), (61, "about 1 minute"), (89 * 60, "about 89 minutes"),
                                           (2 * 3600, "about 2.0 hours"), (35 * 3600, "about 35 hours"),
                                           (100 * 3600, "about 4 days")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert preflight.human_duration(seconds) == text


# --- the checks before anything slow -----------------------------------------------------------------------------


def data_dir(directory: Path, train_tokens: int = 20_000, val_tokens: int = 2_000) -> Path:
    """A prepared dir of synthetic ids (the checks read sizes, not text)."""
    ids = [i % 50_000 for i in range(train_tokens + val_tokens)]
    write_shard_dir(directory, [("train", ids[:train_tokens]), ("val", ids[train_tokens:])], vocab_size=50257,
                    fingerprint="test")
    return directory


def checked(tmp_path: Path, overrides: list[str], machine=None, resume: str = "auto",
            **data) -> tuple[preflight.Preflight, str]:
    proj = project([*NANO_RUN, f'data.dir="{data_dir(tmp_path / "data", **data)}"',
                    f'project.out_dir="{tmp_path / "run"}"', *overrides])
    stream = io.StringIO()
    result = preflight.preflight(proj, machine.device if machine else "cpu", resume, stream=stream,
                                 machine=machine or cpu())
    return result, stream.getvalue()


def test_a_finished_run_says_so_and_how_to_train_further(tmp_path):
    proj = project(NANO_RUN)
    fake_checkpoint(tmp_path / "run", 10, proj)
    result, text = checked(tmp_path, [])
    assert result.finished and text.strip() == result.finished
    assert "has finished" in text and "step 10 of train.max_steps = 10" in text
    assert "--set train.max_steps=20" in text and "--restart" in text and "gpt train --consolidate" in text
    result, _ = checked(tmp_path, ["train.max_steps=12"])  # raised: 2 steps left
    assert not result.finished and result.plan.steps == 2
    result, _ = checked(tmp_path, [], resume="never")  # a fresh start is refused later, with its reason
    assert not result.finished


def test_a_token_budget_reached_is_a_finished_run_too(tmp_path):
    fake_checkpoint(tmp_path / "run", 4, project(NANO_RUN), tokens=5000)
    result, text = checked(tmp_path, ["train.max_tokens=4000"])
    assert result.finished and "train.max_tokens = 4,000" in text and "--set train.max_tokens=10000" in text


def test_a_run_dir_of_another_model_names_restart_and_another_out_dir(tmp_path):
    fake_checkpoint(tmp_path / "run", 4, project(NANO_RUN))
    with pytest.raises(GptError) as error:
        checked(tmp_path, ["model.preset=tiny"])
    message = str(error.value)
    assert "holds a run of another model" in message and "model.block_size is 256 in this project but 64" in message
    assert "--restart" in message and "project.out_dir" in message


def test_a_tracker_without_its_package_is_refused_before_deepspeed(tmp_path, monkeypatch):
    from gptcli.train.observing import trackers

    monkeypatch.setattr(trackers.TensorBoardTracker, "requires", "no_such_module_for_gptcli_tests")
    with pytest.raises(GptError, match=r'train.tensorboard = true asks for tensorboard, but '
                                       r'no_such_module_for_gptcli_tests is not installed: pip install '
                                       r'"gptcli\[tensorboard\]"'):
        checked(tmp_path, ["train.tensorboard=true"])
    checked(tmp_path, ["train.tensorboard=false"])  # off: nothing to install


@pytest.mark.parametrize("val_tokens, batch", [(2_000, 4), (200, 3), (64, 0)])
def test_a_small_val_split_is_evaluated_on_what_it_holds(tmp_path, val_tokens, batch):
    from gptcli.batch import BatchLayout
    from gptcli.data.source import open_source

    result, text = checked(tmp_path, [], val_tokens=val_tokens)
    source = open_source(project([f'data.dir="{tmp_path / "data"}"']).data)
    assert source.evaluation_batch(BatchLayout(4, 3, 1, 64)) == batch
    assert (source.val_loader(BatchLayout(4, 3, 1, 64), rank=0, seed=0) is None) == (batch == 0)  # the loop's
    if batch == 4:
        assert "note:" not in text
    elif batch:
        assert f"evaluation runs micro batches of {batch} sequences, not 4" in text and "data.val_fraction" in text
    else:
        assert "evaluation is off" in text and "data.val_fraction" in text


def test_a_train_split_smaller_than_one_batch_is_refused_before_deepspeed(tmp_path):
    with pytest.raises(GptError, match="fewer than one batch of 4 sequences × 65 tokens.*train.micro_batch_size"):
        checked(tmp_path, [], train_tokens=200)


def test_a_run_that_does_not_fit_the_gpu_names_the_change_that_would(tmp_path):
    overrides = ["model.preset=gpt2", "train.micro_batch_size=32", "train.grad_accum_steps=4", "train.seq_len=1024"]
    with pytest.raises(GptError) as error:
        checked(tmp_path, overrides, machine=gpu(free=16 * 2**30), train_tokens=200_000)
    message = str(error.value)
    assert "per GPU" in message and "16.0 GiB is free on cuda:0" in message
    proj = project([*NANO_RUN, *overrides])
    training = planner.training_for(proj, "cuda", 1, "bf16")
    largest = planner.largest_micro_batch(training, 16 * 2**30, False, context_counted=True, per_rank=128)
    best = max(m for m in range(1, largest + 1) if 128 % m == 0)
    assert f"train.micro_batch_size = {best} with train.grad_accum_steps = {128 // best}" in message
    assert "--set train.memory_check=false" in message
    result, text = checked(tmp_path, [*overrides, "train.memory_check=false"], machine=gpu(free=16 * 2**30),
                           train_tokens=200_000)
    assert "does not fit" in text and result.plan.fits is False
    result, text = checked(tmp_path, [*overrides, f"train.micro_batch_size={best}", f"train.grad_accum_steps={128 // best}"],
                           machine=gpu(free=16 * 2**30), train_tokens=200_000)
    assert result.plan.fits and ": fits" in text


def test_only_rank_zero_speaks_but_every_rank_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result, text = checked(tmp_path, [])
    assert text == "" and result.plan.training.ranks == 1  # the injected machine's ranks
    with pytest.raises(GptError, match="fewer than one batch"):
        checked(tmp_path, [], train_tokens=200)


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_gpt_train_on_a_finished_run_exits_at_once_without_starting_deepspeed(tmp_path):
    proj = project(NANO_RUN)
    fake_checkpoint(tmp_path / "run", 10, proj)
    data = data_dir(tmp_path / "data")
    result = run_gpt("train", *[f"--set={item}" for item in NANO_RUN], f'--set=data.dir="{data}"',
                     f'--set=project.out_dir="{tmp_path / "run"}"', "--set=train.device=\"cpu\"")
    assert result.returncode == 0, result.stderr
    assert "has finished" in result.stderr and "loading DeepSpeed" not in result.stderr


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_gpt_train_refuses_a_run_dir_of_another_model_before_loading_deepspeed(tmp_path):
    fake_checkpoint(tmp_path / "run", 4, project(NANO_RUN))
    data = data_dir(tmp_path / "data")
    result = run_gpt("train", *[f"--set={item}" for item in NANO_RUN], "--set=model.n_layer=3",
                     f'--set=data.dir="{data}"', f'--set=project.out_dir="{tmp_path / "run"}"',
                     "--set=train.device=\"cpu\"")
    assert_user_error(result, "holds a run of another model", "model.n_layer is 3 in this project but 2", "--restart")
    assert "loading DeepSpeed" not in result.stderr


def test_a_missing_task_data_file_is_refused_before_deepspeed(tmp_path):
    """[eval] tasks with a local file that is not there: one sentence in pre-flight, not after the engine."""
    proj = project(['eval.tasks=["lambada"]', f'eval.task_data={{ lambada = "{tmp_path / "nope.jsonl"}" }}'])

    def measure_cpu():  # the first slow thing pre-flight does
        raise AssertionError("the CPU was measured before the missing task file was named")

    with pytest.raises(GptError, match=f"Task data file {tmp_path / 'nope.jsonl'} does not exist"):
        preflight.preflight(proj, "cpu", "never", measure_cpu=measure_cpu)
    (tmp_path / "lambada.csv").write_text("text\n")
    other = project(['eval.tasks=["lambada"]', f'eval.task_data={{ lambada = "{tmp_path / "lambada.csv"}" }}'])
    with pytest.raises(GptError, match="must be a .jsonl"):
        preflight.preflight(other, "cpu", "never", measure_cpu=measure_cpu)
