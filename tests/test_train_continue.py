"""Continuing from anything, with real runs on the CPU: a run started from a `gpt load-hf`'d model
(`[train] init_from`) starts at transformers' loss and resumes bit for bit without its source; a
checkpoint saved on 2 ranks resumes on 1 and one saved on 1 resumes on 2, at ZeRO 0-3, in fp32 and bf16,
with the windows of every optimizer step, the fp32 masters and both Adam moments carried over exactly.

What happened inside a run is read through GPTCLI_PROBE_DIR (train/probes.py): the window indices each
rank's loader handed out, and the full optimizer state as DeepSpeed's own accessors assemble it, saved
and right after loading. Each uninterrupted run is made once per module and reused by the resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tomllib
import torch

from conftest import (
    NANO_RUN,
    SMALL_BF16,
    assert_user_error,
    losses,
    project_file,
    rewound_copy,
    run_gpt,
    train,
    trained,
)

pytestmark = pytest.mark.slow

# No dropout: runs on different numbers of ranks draw it on different ranks, so only without it can their
# losses be compared. Accumulation 2 (NANO_RUN's), so that resuming on other ranks must adapt it.
CONTINUE = ("train.max_steps=6", "train.eval_every=0")


def continue_project(directory: Path, shards: Path, *overrides: str, name: str = "run", from_weights=False) -> Path:
    """NANO_RUN without dropout, 6 steps, no evaluation, and `overrides`; `from_weights`: without a [model] table
    (the model is the source's, dropout included), as a run from weights sets no [model] key."""
    if from_weights:
        return project_file(directory, shards, *CONTINUE, *overrides, name=name, without=("model",))
    return project_file(directory, shards, "model.dropout=0.0", *CONTINUE, *overrides, name=name)


def step_windows(probe: Path, ranks: int, accumulation: int, first_step: int, last_step: int) -> dict[int, list]:
    """{step: sorted window indices} from the probe's per-rank lists (a rank's micro batch m belongs to step
    first_step + m // accumulation; what was read ahead past last_step is left out)."""
    steps: dict[int, list] = {}
    for rank in range(ranks):
        lines = (probe / f"windows-rank{rank}.jsonl").read_text().splitlines()
        for micro, line in enumerate(lines):
            step = first_step + micro // accumulation
            if step <= last_step:
                record = json.loads(line)
                steps.setdefault(step, []).extend((record["epoch"], i) for i in record["windows"])
    return {step: sorted(windows) for step, windows in steps.items()}


def assert_same_state(saved: dict, loaded: dict) -> None:
    assert saved["step"] == loaded["step"]
    names = [name for name in saved if name != "step"]
    assert names and set(names) == {name for name in loaded if name != "step"}
    for name in names:
        assert set(saved[name]) == {"fp32", "exp_avg", "exp_avg_sq"} == set(loaded[name])
        for key in saved[name]:
            assert torch.equal(saved[name][key], loaded[name][key]), (name, key)


# --- resuming on another number of ranks ----------------------------------------------------------------------

RUNS: dict = {}


def settings(stage: int, precision: str) -> tuple[str, ...]:
    """bf16 runs take SMALL_BF16's tokens (2 sequences of 32 per micro batch)."""
    small = SMALL_BF16 if precision == "bf16" else ()
    return (*small, f"deepspeed.zero_stage={stage}", f'train.precision="{precision}"')


def sequences_per_micro_batch(precision: str) -> int:
    return 2 if precision == "bf16" else NANO_RUN["train"]["micro_batch_size"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    """(stage, precision, ranks) → the run dir and probe dir of that uninterrupted run, made once."""
    def get(stage: int, precision: str, ranks: int) -> tuple[Path, Path]:
        key = (stage, precision, ranks)
        if key not in RUNS:
            directory = tmp_path_factory.mktemp(f"z{stage}-{precision}-{ranks}")
            run = trained(continue_project(directory, shards, *settings(stage, precision)), ranks=ranks,
                          probe=directory / "probe")
            RUNS[key] = (run, directory / "probe")
        return RUNS[key]
    return get


@pytest.mark.parametrize("stage,precision,saved_on,resumed_on", [
    (0, "fp32", 2, 1), (2, "fp32", 2, 1), (2, "fp32", 1, 2), (3, "fp32", 1, 2), (1, "bf16", 1, 2), (3, "bf16", 2, 1)])
def test_resuming_on_another_number_of_ranks_carries_everything_over(tmp_path, shards, uninterrupted, stage,
                                                                    precision, saved_on, resumed_on):
    """From the uninterrupted run's checkpoint of step 3, on the other number of ranks: the masters and moments
    right after loading equal the saved ones bit for bit; steps 4-6 take the same windows; the losses stay
    within 1e-5 (fp32; the reductions run in another order) or 5e-4 (bf16: a master that lands on the other
    side of a bf16 rounding boundary moves its bf16 copy by a whole bf16 step; up to 5e-5 measured).

    One case for each way the state is saved and converted, each direction at least once: ZeRO-0 (no
    conversion: every rank holds everything), the ZeRO-1/2 optimizer (one class and one checkpoint layout for
    both stages in fp32) both ways, ZeRO-3 (its nested groups and shared step count) both ways, once in fp32
    and once in bf16, and bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer, its own layout)."""
    reference, reference_probe = uninterrupted(stage, precision, saved_on)
    run_dir = rewound_copy(reference, tmp_path / "run", 3)
    project = continue_project(tmp_path, shards, *settings(stage, precision))
    result = train(project, "--resume", "required", ranks=resumed_on, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert f"from checkpoint step_00000003 (step 3), saved on {saved_on} rank" in message
    assert f"at step 3 on {resumed_on} ranks (saved on {saved_on})" in message
    assert ("converting checkpoint step_00000003" in message) == (stage > 0)
    assert not (run_dir / "checkpoints" / "step_00000003" / "universal").exists()  # dropped once step 6 was saved

    saved = torch.load(reference_probe / "state-saved-step00000003.pt")
    assert_same_state(saved, torch.load(tmp_path / "probe" / "state-loaded-step00000003.pt"))

    per_step = 2 * sequences_per_micro_batch(precision) * saved_on  # accumulation 2 on the saving ranks
    accumulation = per_step // sequences_per_micro_batch(precision) // resumed_on
    expected = step_windows(reference_probe, saved_on, 2, 1, 6)
    assert step_windows(tmp_path / "probe", resumed_on, accumulation, 4, 6) == {s: expected[s] for s in (4, 5, 6)}
    assert len(expected[4]) == per_step

    tolerance = 1e-5 if precision == "fp32" else 5e-4
    assert losses(run_dir)[:3] == losses(reference)[:3]
    assert losses(run_dir)[3:] == pytest.approx(losses(reference)[3:], abs=tolerance, rel=0)
    after = torch.load(tmp_path / "probe" / "state-saved-step00000006.pt")
    expected_after = torch.load(reference_probe / "state-saved-step00000006.pt")
    assert after["step"] == expected_after["step"] == 6  # one count for every group
    if precision == "fp32":  # the same optimizer from there on: weight decay per group, the same bias corrections
        for name in (name for name in after if name != "step"):
            torch.testing.assert_close(after[name]["fp32"], expected_after[name]["fp32"], atol=1e-5, rtol=0)
    client = json.loads((run_dir / "checkpoints" / "step_00000006" / "client_state.json").read_text())
    assert client["world_size"] == resumed_on and client["loader"]["windows_per_step"] == per_step


def test_uninterrupted_runs_on_one_and_two_ranks_take_the_same_windows_per_step(uninterrupted):
    """With the same sequences per step (2 ranks × accumulation 2 vs 1 rank × 4), the windows of every step
    are the same however ranks and accumulation divide it."""
    _, one = uninterrupted(2, "fp32", 1)
    _, two = uninterrupted(2, "fp32", 2)
    one_rank = step_windows(one, 1, 2, 1, 6)  # 8 per step
    two_ranks = step_windows(two, 2, 2, 1, 6)  # 16 per step: steps 1-3 = the 1-rank run's steps 1-6
    merged = {step: sorted(one_rank[2 * step - 1] + one_rank[2 * step]) for step in (1, 2, 3)}
    assert {step: two_ranks[step] for step in (1, 2, 3)} == merged


def test_a_kill_in_the_middle_of_the_conversion_leaves_the_checkpoint_usable(tmp_path, shards, uninterrupted):
    reference, _ = uninterrupted(2, "fp32", 1)
    run_dir = rewound_copy(reference, tmp_path / "run", 3)
    project = continue_project(tmp_path, shards, "deepspeed.zero_stage=2")
    checkpoint = run_dir / "checkpoints" / "step_00000003"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    killed = train(project, ranks=2, fault="kill_in_convert@3@0")
    assert killed.returncode != 0
    assert not (checkpoint / "universal").exists()
    assert [p.name for p in checkpoint.iterdir() if p.name.startswith(".universal.convert-")]  # left by the kill
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if not p.name.startswith(".")} == before
    resumed = train(project, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in checkpoint.iterdir() if p.name.startswith(".universal.convert-")]
    assert losses(run_dir)[3:] == pytest.approx(losses(reference)[3:], abs=1e-5, rel=0)


# --- starting from weights --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A random transformers GPT-2 with GPT-2's vocabulary and the nano shape, and its `gpt load-hf` model dir."""
    from hf_twin import hf_gpt2

    directory = tmp_path_factory.mktemp("hf-source")
    hf = hf_gpt2(seed=3, vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=64, initializer_range=0.05)
    hf.save_pretrained(directory / "hf")
    loaded = run_gpt("load-hf", directory / "hf", "--out", directory / "model")
    assert loaded.returncode == 0, loaded.stderr
    return directory / "hf", directory / "model"


def transformers_step_loss(hf_dir: Path, shards: Path, probe: Path, ranks: int, accumulation: int) -> float:
    """The mean loss transformers gives the first optimizer step's micro batches (the windows the probe saw)."""
    from transformers import GPT2LMHeadModel

    from gptcli.data.loader import BatchLoader
    from gptcli.data.shards import open_prepared

    reader = BatchLoader(open_prepared(shards), "train", NANO_RUN["train"]["micro_batch_size"],
                         NANO_RUN["train"]["seq_len"], shuffle=False)
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    batch_losses = []
    for rank in range(ranks):
        for line in (probe / f"windows-rank{rank}.jsonl").read_text().splitlines()[:accumulation]:
            rows = torch.stack([torch.from_numpy(reader.window(i).astype("int64")) for i in json.loads(line)["windows"]])
            with torch.no_grad():
                logits = model(rows[:, :-1]).logits
            batch_losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item())
    return sum(batch_losses) / len(batch_losses)


def test_a_run_from_a_load_hf_model_starts_at_transformers_loss_and_resumes_bit_for_bit(tmp_path, shards,
                                                                                        hf_source):
    hf_dir, source = hf_source
    model_dir = shutil.copytree(source, tmp_path / "source")  # this test moves it away
    settings = (f'train.init_from="{model_dir}"', "train.lr=3e-4", "deepspeed.zero_stage=0", "train.max_steps=4",
                "train.checkpoint_every=2")
    whole = train(continue_project(tmp_path, shards, *settings, name="whole", from_weights=True),
                  probe=tmp_path / "probe")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = losses(tmp_path / "whole")[0]
    assert first == pytest.approx(transformers_step_loss(hf_dir, shards, tmp_path / "probe", 1, 2), abs=1e-5, rel=0)

    from safetensors import safe_open

    from gptcli.train.state.warmstart import weights_sha256

    digest = weights_sha256([model_dir / "model.safetensors"])
    assert f"from weights: train.init_from {model_dir} = {model_dir / 'model.safetensors'} (sha256 {digest})" in \
        " ".join(whole.stderr.split())
    resolved = tomllib.loads((tmp_path / "whole" / "config.resolved.toml").read_text())
    assert resolved["train"]["init_from"] == str(model_dir) and resolved["train"]["init_from_sha256"] == digest
    assert resolved["model"]["n_layer"] == 2 and resolved["model"]["n_embd"] == 64  # from the source's config
    with safe_open(tmp_path / "whole" / "model" / "model.safetensors", "pt") as weights:
        assert weights.metadata()["init_from_sha256"] == digest

    project = continue_project(tmp_path, shards, *settings, name="killed", from_weights=True)
    assert train(project, fault="kill@3").returncode in (-9, 137)
    model_dir.rename(tmp_path / "moved-away")  # a resumed run never reads its source again
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the run started from weights" in resumed.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")


def test_two_rank_zero3_from_weights_with_a_padded_vocabulary_starts_at_transformers_loss(tmp_path, shards, hf_source):
    """The vocabulary padding a GPU gives GPT-2 (vocab_multiple: 50,257 → 50,304 rows) and ZeRO-3's partitions:
    the first loss is still transformers'."""
    hf_dir, model_dir = hf_source
    settings = (f'train.init_from="{model_dir}"', "deepspeed.zero_stage=3", "model.vocab_multiple=128",
                "train.max_steps=1", "train.checkpoint_every=0")
    project = continue_project(tmp_path, shards, *settings, from_weights=True)
    result = train(project, ranks=2, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    initialized = torch.load(tmp_path / "probe" / "state-initialized-step00000000.pt")
    assert initialized["wte.weight"]["fp32"].shape == (50304, 64) and not initialized["wte.weight"]["fp32"][50257:].any()
    expected = transformers_step_loss(hf_dir, shards, tmp_path / "probe", 2, 2)
    assert losses(tmp_path / "run")[0] == pytest.approx(expected, abs=1e-5, rel=0)


@pytest.mark.parametrize("stage,ranks", [(0, 1), (1, 1), (2, 1), (3, 2)])
def test_bf16_from_weights_keeps_their_exact_fp32_values_as_the_masters(tmp_path, shards, hf_source, stage, ranks):
    """DeepSpeed makes the masters from the module's bf16 copy; a run from weights must not lose their low bits
    (ZeRO-0: DeepSpeed's FP16 optimizer; 1: BF16_Optimizer; 2: the ZeRO-1/2 optimizer; 3: ZeRO-3's: each builds
    its masters its own way). One step of SMALL_BF16's tokens: the masters are read before it."""
    from safetensors.torch import load_file

    _, model_dir = hf_source
    settings = (f'train.init_from="{model_dir}"', *SMALL_BF16, f"deepspeed.zero_stage={stage}", "train.max_steps=1",
                "train.checkpoint_every=0")
    project = continue_project(tmp_path, shards, *settings, from_weights=True)
    result = train(project, ranks=ranks, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    initialized = torch.load(tmp_path / "probe" / "state-initialized-step00000000.pt")
    source = load_file(model_dir / "model.safetensors")
    assert set(source) == {name for name in initialized if name != "step"}
    for name, tensor in source.items():
        assert torch.equal(initialized[name]["fp32"], tensor), name
    assert not all(torch.equal(t, t.bfloat16().float()) for t in source.values())  # there were bits to lose


def test_contradicting_model_keys_through_gpt_train_are_one_sentence(tmp_path, shards, hf_source):
    _, model_dir = hf_source
    project = continue_project(tmp_path, shards, f'train.init_from="{model_dir}"')
    result = train(project, "--set", "model.n_layer=4")
    assert_user_error(result, "model.n_layer is 4 in the project but 2 in train.init_from", "leave it out of [model]")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_on_a_gpu_a_gpt2_family_source_trains_with_padded_rows_and_consolidates_to_its_own(tmp_path, shards):
    """A GPU pads the GPT-2 presets' embedding to 50,304 rows (engine.training_model_config): the source's 50,257
    rows go first, the padding rows are zero, the bf16 masters are the source's exact values, and RUN/model
    holds 50,257 rows again. A distilgpt2-shaped random model stands in for OpenAI's."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=6)).save_pretrained(tmp_path / "hf")
    assert run_gpt("load-hf", tmp_path / "hf", "--out", tmp_path / "source").returncode == 0
    settings = (f'train.init_from="{tmp_path / "source"}"', 'train.device="cuda"', 'train.precision="bf16"',
                "deepspeed.zero_stage=1", "train.max_steps=2", "train.checkpoint_every=0")
    project = continue_project(tmp_path, shards, *settings, from_weights=True)
    result = train(project, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    source = load_file(tmp_path / "source" / "model.safetensors")
    masters = torch.load(tmp_path / "probe" / "state-initialized-step00000000.pt")["wte.weight"]["fp32"]
    assert masters.shape == (50304, 768) and not masters[50257:].any()
    assert torch.equal(masters[:50257], source["wte.weight"])
    assert load_file(tmp_path / "run" / "model" / "model.safetensors")["wte.weight"].shape == (50257, 768)
