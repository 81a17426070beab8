"""What the trackers cost a run: the time rank 0 spends handing one step's record to each tracker, against
writing metrics.jsonl + metrics.csv alone (the reference, measured in the same process), and each
tracker's one-off start (import, store, run) and end.

Records shaped as the loop writes them (9 numbers, an evaluation every 50 steps), one every --step-ms
(a sleep stands for the step, as a GPU step leaves the CPU free for the trackers' own threads); W&B
offline, MLflow in its default store (a new RUN/mlflow/mlflow.db), TensorBoard in the run dir, all under a
temporary directory.

    python bench/trackers.py [--steps 500] [--step-ms 20] [--trackers tensorboard,wandb,mlflow]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gptcli.config import load_project
from gptcli.train.observing.metrics import MetricsWriter
from gptcli.train.observing.trackers import start_trackers


def records(steps: int) -> list[dict]:
    made = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 10.0 / math.sqrt(step), "lr": 6e-4, "grad_norm": 1.0 / step,
                  "tokens": 524_288 * step, "tokens_per_s": 1.1e6, "mfu": 0.41, "elapsed": 0.48 * step,
                  "skipped_steps": 0}
        if step % 50 == 0:
            record |= {"eval_loss": 3.0, "eval_perplexity": math.exp(3.0)}
        made.append(record)
    return made


def measure(trackers: list[str], steps: int, step_s: float, directory: Path) -> dict:
    """Seconds to start, per record (median of 5 blocks), and to end, for MetricsWriter with `trackers`."""
    run_dir = directory / ("run-" + ("-".join(trackers) or "none"))
    run_dir.mkdir(parents=True)
    project = load_project(None, ['model.preset="gpt2"', f"train.trackers={json.dumps(trackers)}",
                                  f'project.out_dir="{run_dir}"'])
    started = time.perf_counter()
    writer = MetricsWriter(run_dir, start_trackers(project, run_dir, 0))
    start = time.perf_counter() - started
    blocks, todo = [], records(steps)
    size = len(todo) // 5
    for first in range(0, size * 5, size):
        spent = 0.0
        for record in todo[first:first + size]:
            time.sleep(step_s)
            began = time.perf_counter()
            writer.write(record)
            spent += time.perf_counter() - began
        blocks.append(spent / size)
    began = time.perf_counter()
    writer.end(steps, 0, None)
    writer.close()
    return {"start_s": start, "per_record_s": sorted(blocks)[2], "end_s": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--trackers", default="tensorboard,wandb,mlflow")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the default store: RUN/mlflow/mlflow.db, a new one
    with tempfile.TemporaryDirectory() as tmp:
        reference = measure([], args.steps, args.step_ms / 1000, Path(tmp))
        print(f"metrics.jsonl + csv alone: {reference['per_record_s'] * 1e6:8.1f} µs per step")
        for name in args.trackers.split(","):
            found = measure([name], args.steps, args.step_ms / 1000, Path(tmp))
            added = found["per_record_s"] - reference["per_record_s"]
            print(f"+ {name:<11}: {found['per_record_s'] * 1e6:8.1f} µs per step ({added * 1e6:+.1f} µs, "
                  f"{found['per_record_s'] / reference['per_record_s']:.1f}x the reference); "
                  f"start {found['start_s']:.2f} s, end {found['end_s']:.2f} s")


if __name__ == "__main__":
    main()
