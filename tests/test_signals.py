"""Never lose work, as a careless or unlucky user tries it: a 120-step run hit by 14 signals (SIGTERM, SIGINT,
SIGKILL) at steps drawn with a fixed seed resumes, each time, to the same 120 losses bit for bit as the run
that was never interrupted; a SIGTERM during a step that never ends stops within its bound; and one checkpoint
of the run serves `gpt generate --checkpoint RUN/checkpoints/step_N`, consolidated on the fly.

Every test here starts `gpt train` more than once: slow."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HANG_SECONDS, gpt_env, losses, out_dir, project_file, run_gpt, train, train_env, trained

pytestmark = pytest.mark.slow

STEPS = 120
SIGNALS = 14
# nano with short steps: 2 × 32 tokens; dropout, so that a resume must restore the RNG states too; a checkpoint
# every 5 steps, so that a kill loses at most 4 steps; no evaluation or samples (they cost time, not state).
# On the session's shards (conftest.shards), through conftest's one project builder.
SIGNAL_RUN = {
    "project": {"seed": 34},
    "model": {"preset": "nano", "dropout": 0.1},
    "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1, "seq_len": 32, "warmup_steps": 10,
              "checkpoint_every": 5, "keep_checkpoints": 2, "eval_every": 0, "sample_every": 0, "device": "cpu"},
    "deepspeed": {"zero_stage": 1},
}


def logged_steps(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """The uninterrupted run."""
    return trained(project_file(tmp_path_factory.mktemp("reference"), shards, base=SIGNAL_RUN))


def test_fourteen_random_signals_and_resumes_give_the_same_losses_bit_for_bit(tmp_path, shards, reference):
    draw = random.Random(34)
    # At least 4 steps apart: a run stopped at a target (or one step after it) resumes from a checkpoint below
    # the next target, so each signal reaches a process that is training, not one still starting.
    targets = sorted(draw.sample(range(3, STEPS - 2, 4), SIGNALS))
    kinds = [draw.choice([signal.SIGTERM, signal.SIGINT, signal.SIGKILL]) for _ in targets]
    project = project_file(tmp_path, shards, base=SIGNAL_RUN)
    run_dir = out_dir(project)
    expected_codes = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}
    for target, kind in zip(targets, kinds, strict=True):
        process = subprocess.Popen([sys.executable, "-m", "gptcli", "train", "--project", str(project)],
                                   env=gpt_env(train_env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + HANG_SECONDS
        while logged_steps(run_dir) < target and process.poll() is None:
            assert time.monotonic() < deadline, f"step {target} never came"
            time.sleep(0.05)
        process.send_signal(kind)
        _, stderr = process.communicate(timeout=HANG_SECONDS)
        assert process.returncode == expected_codes[kind], (target, kind, stderr[-3000:])
        assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]
    assert losses(trained(project)) == losses(reference)


def test_a_sigterm_during_a_step_that_never_ends_stops_without_saving_it(tmp_path, shards):
    """A CPU run whose plan swapped: SIGTERM waited for a step that could not finish."""
    project = project_file(tmp_path, shards, "train.max_steps=6", "train.checkpoint_every=2", base=SIGNAL_RUN)
    result = train(project, fault="sigterm@5,stall@5")
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Step 5 has not ended 10 s after SIGTERM (is the machine swapping?" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    resumed = train(project)
    assert resumed.returncode == 0 and "Resuming from" in resumed.stderr, resumed.stderr[-3000:]


def test_one_checkpoint_of_a_run_is_a_checkpoint_for_generate(tmp_path, reference_run):
    """generate/eval/export-hf could not take an intermediate checkpoint; users pick the best one. It is
    consolidated into a temporary model dir, removed after. The session's reference run: its last checkpoint
    is what its RUN/model holds."""
    last = reference_run / "checkpoints" / "step_00000008"
    args = ("--max-new-tokens", "12", "--seed", "3", "--json", "--device", "cpu")
    from_checkpoint = run_gpt("generate", "def ", "--checkpoint", last, *args, env={"TMPDIR": str(tmp_path)})
    from_model = run_gpt("generate", "def ", "--checkpoint", reference_run, *args)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-3000:]
    assert json.loads(from_checkpoint.stdout) == json.loads(from_model.stdout)  # RUN/model is that checkpoint
    assert list(tmp_path.iterdir()) == []
