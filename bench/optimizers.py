"""Muon against AdamW on a corpus the project never tuned on: the steps each needs to reach the validation loss
AdamW has after 600 steps, and the time per step of each on this CPU.

    python bench/optimizers.py                  # nano and tiny, 600 steps, ../shared/corpora/tinyshakespeare.txt
    python bench/optimizers.py --presets nano --steps 200 --json

Each preset trains twice with `gpt train`, as a user runs it, from the same seed on the same shards (the corpus
prepared with the GPT-2 tokenizer, 10% held out for validation): `train.optimizer = "adamw"` and "muon", every
other key the preset's documented default (its lr, warmup and cosine decay to min_lr over --steps, weight decay
0.1, gradient clipping at 1.0; Muon's own options at theirs: lr 0.02, momentum 0.95, weight decay 0.01). One
rank, fp32, ZeRO-0 for both: where one rank holds everything the stages differ in memory only, and ZeRO-0 is where
DeepSpeed clips the gradients before Muon, so both run the default clipping. The validation loss is taken every
--eval-every steps on the same held-out windows; the step at which a run first reaches the target is
interpolated linearly between two evaluations. The time per step is the median over the run's steps (the clock
of metrics.jsonl), so the evaluations and a passing load spike count little; the two runs follow each other, so
a machine whose load changes between them shifts the ratio (the report says the load average).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the clone (a worktree's clone sits one level deeper); read there, never copied.
CORPUS = next((base / "shared" / "corpora" / "tinyshakespeare.txt" for base in (REPO.parent, REPO.parent.parent)
               if (base / "shared" / "corpora" / "tinyshakespeare.txt").is_file()),
              REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt")

PROJECT = """\
[project]
out_dir = "{out}"
seed = 1234
[data]
dir = "{data}"
[model]
preset = "{preset}"
[train]
optimizer = "{optimizer}"
max_steps = {steps}
eval_every = {eval_every}
eval_batches = {eval_batches}
checkpoint_every = 0
device = "cpu"
precision = "fp32"
[deepspeed]
zero_stage = 0
"""

# Held-out windows per evaluation: about 20,000 tokens for either preset (nano's micro batch is 8 × 64
# tokens, tiny's 8 × 256), the same windows each time.
EVAL_BATCHES = {"nano": 40, "tiny": 10}


def gpt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True, env=env)


def prepare(corpus: Path, out: Path) -> dict:
    result = gpt("prepare", str(corpus), "--out", str(out), "--val-fraction", "0.1", "--json")
    if result.returncode != 0:
        raise SystemExit(f"gpt prepare failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def train(work: Path, data: Path, preset: str, optimizer: str, steps: int, eval_every: int) -> list[dict]:
    """One `gpt train` run; its metrics.jsonl records."""
    directory = work / f"{preset}-{optimizer}"
    directory.mkdir(parents=True)
    project = directory / "run.toml"
    project.write_text(PROJECT.format(out=directory / "run", data=data, preset=preset, optimizer=optimizer,
                                      steps=steps, eval_every=eval_every, eval_batches=EVAL_BATCHES.get(preset, 20)))
    result = gpt("train", "--project", str(project))
    if result.returncode != 0:
        raise SystemExit(f"gpt train ({preset}, {optimizer}) failed: {result.stderr[-2000:]}")
    return [json.loads(line) for line in (directory / "run" / "metrics.jsonl").read_text().splitlines()]


def evaluations(records: list[dict]) -> list[tuple[int, float]]:
    return [(record["step"], record["eval_loss"]) for record in records if "eval_loss" in record]


def steps_to_reach(target: float, evals: list[tuple[int, float]]) -> Optional[float]:
    """The first step at which the validation loss reaches `target`, interpolated linearly between the two
    evaluations around it; None if it never does."""
    previous = (0, float("inf"))
    for step, loss in evals:
        if loss <= target:
            if previous[1] == float("inf"):
                return float(step)
            return previous[0] + (step - previous[0]) * (previous[1] - target) / (previous[1] - loss)
        previous = (step, loss)
    return None


def seconds_per_step(records: list[dict]) -> float:
    elapsed = [record["elapsed"] for record in records]
    return statistics.median(later - earlier for earlier, later in itertools.pairwise(elapsed))


def compare(work: Path, data: Path, preset: str, steps: int, eval_every: int) -> dict:
    load = os.getloadavg()[0]
    started = time.time()
    runs = {optimizer: train(work, data, preset, optimizer, steps, eval_every) for optimizer in ("adamw", "muon")}
    evals = {optimizer: evaluations(records) for optimizer, records in runs.items()}
    target = evals["adamw"][-1][1]
    reached = {optimizer: steps_to_reach(target, curve) for optimizer, curve in evals.items()}
    seconds = {optimizer: seconds_per_step(records) for optimizer, records in runs.items()}
    return {
        "preset": preset, "steps": steps, "target_val_loss": target,
        "final_val_loss": {optimizer: curve[-1][1] for optimizer, curve in evals.items()},
        "steps_to_target": reached,
        "steps_ratio": reached["muon"] / reached["adamw"] if reached["muon"] and reached["adamw"] else None,
        "seconds_per_step": seconds, "time_ratio": seconds["muon"] / seconds["adamw"],
        "val_loss": evals, "load_average": [load, os.getloadavg()[0]], "seconds": time.time() - started,
    }


def report(result: dict) -> list[str]:
    reached, seconds, final = result["steps_to_target"], result["seconds_per_step"], result["final_val_loss"]
    muon = f"{reached['muon']:.0f}" if reached["muon"] is not None else f"not within {result['steps']}"
    ratio = f"{result['steps_ratio']:.2f}×" if result["steps_ratio"] is not None else "—"
    return [f"{result['preset']}: AdamW's val loss after {result['steps']} steps {result['target_val_loss']:.4f}; "
            f"reached by AdamW at step {reached['adamw']:.0f}, by Muon at step {muon} ({ratio} the steps); "
            f"Muon's own val loss at {result['steps']}: {final['muon']:.4f}",
            f"  time per step: AdamW {seconds['adamw'] * 1000:.0f} ms, Muon {seconds['muon'] * 1000:.0f} ms "
            f"({result['time_ratio']:.2f}×); load average {result['load_average'][0]:.1f} at the start, "
            f"{result['load_average'][1]:.1f} at the end, {result['seconds'] / 60:.0f} minutes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="text file (default: %(default)s)")
    parser.add_argument("--presets", nargs="+", default=["nano", "tiny"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="one JSON object per preset")
    args = parser.parse_args()
    if not args.corpus.is_file():
        raise SystemExit(f"no corpus at {args.corpus}; give one with --corpus FILE")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gptcli-bench-optimizers-") as scratch:
        work = Path(scratch)
        prepared = prepare(args.corpus, work / "shards")
        if not args.json:
            print(f"{args.corpus.name}: {prepared['tokens']['train']:,} training tokens, "
                  f"{prepared['tokens']['val']:,} held out; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} CPUs")
        for preset in args.presets:
            result = compare(work, work / "shards", preset, args.steps, args.eval_every)
            print(json.dumps(result) if args.json else "\n".join(report(result)), flush=True)
    if not args.json:
        print(f"{time.time() - started:.0f} s in all; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
