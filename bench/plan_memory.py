"""The planner's memory per rank against what a DeepSpeed engine really holds, one configuration per process.

Each configuration (a list of `--set` overrides) builds the engine as `gpt train` does (engine.initialize),
runs two optimizer steps on random tokens and measures the peak of tensor memory in the forward+backward
part and in the optimizer step of the last one:
- on the CPU with torch's MemTracker (every live tensor storage counted once; the tensors alive before a
  phase are tracked by weak reference, so they can be freed in it);
- on a GPU with torch.cuda.max_memory_allocated.
Then it prints the planner's figures for the same run (planner.memory_plan) beside them.

    python bench/plan_memory.py "model.preset=nano deepspeed.zero_stage=2 train.precision=bf16" ...
    python bench/plan_memory.py --json CONFIG   # one JSON object per configuration
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))


def live_tensors() -> dict:
    import torch

    found = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.untyped_storage().nbytes() > 0:
                found.setdefault(obj.untyped_storage().data_ptr(), obj)
        except (RuntimeError, ReferenceError):
            pass
    return found


class CpuPeak:
    """Peak bytes of tensor storages alive while `fn` runs, those from before `baseline` left out."""

    def __init__(self, baseline: set):
        self.baseline = baseline

    def __call__(self, fn):
        import torch
        from torch.distributed._tools.mem_tracker import MemTracker

        gc.collect()
        tracker = MemTracker()
        tracker.track_external(*[t for ptr, t in live_tensors().items() if ptr not in self.baseline])
        with tracker:
            out = fn()
        return out, tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def cuda_peak(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated()


def measure(overrides: list[str], device: str, cap: int = 0) -> dict:
    """Build the engine of `overrides`, run 2 optimizer steps, return measured and planned bytes. `cap`:
    on a GPU, limit this process's allocations to that many bytes (a smaller GPU); an out-of-memory error is
    then reported as {"out_of_memory": true}."""
    import torch

    if cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    try:
        return measure_steps(overrides, device)
    except torch.cuda.OutOfMemoryError:
        return {"overrides": overrides, "device": device, "out_of_memory": True}


def measure_steps(overrides: list[str], device: str) -> dict:
    import torch

    from gptcli import planner
    from gptcli.batch import batch_layout
    from gptcli.config import apply_overrides, project_from_dict
    from gptcli.model import build_model
    from gptcli.train.engine import initialize, resolve_precision, training_model_config

    project = project_from_dict(apply_overrides({}, [*overrides, f'train.device="{device}"']))
    precision, layout = resolve_precision(project, device), batch_layout(project.train, project.seq_len, 1)
    torch.manual_seed(0)
    gc.collect()
    baseline = set(live_tensors()) if device == "cpu" else set()
    peak = CpuPeak(baseline) if device == "cpu" else cuda_peak
    model = build_model(training_model_config(project, device), device=device)
    model.activation_checkpointing = project.train.activation_checkpointing
    engine = initialize(project, model, layout, precision, device)
    del model
    vocab = project.model.vocab_size
    inputs = torch.randint(0, vocab, (layout.micro_batch_size, layout.seq_len), device=engine.device)
    targets = torch.randint(0, vocab, (layout.micro_batch_size, layout.seq_len), device=engine.device)
    micro = []
    for _ in range(2 * layout.grad_accum_steps):
        loss, forward = peak(lambda: engine(inputs, targets, return_logits=False)[1])
        _, backward = peak(partial(engine.backward, loss))  # bound now: `del loss` below frees it
        del loss
        _, step = peak(engine.step)
        micro.append((max(forward, backward), step))
    last = micro[layout.grad_accum_steps:]
    training = planner.training_for(project, device, 1, precision)
    plan = planner.memory_plan(training, layout.micro_batch_size, grad_accum_steps=layout.grad_accum_steps)
    totals = [phase.total for phase in plan.phases]
    return {"overrides": overrides, "device": device, "measured": {"forward and backward": max(m for m, _ in last),
                                                                   "optimizer step": last[-1][1]},
            "planned": {"forward and backward": max(totals[:4]), "optimizer step": totals[4]},
            "planned_peak": plan.peak}


def run_one(overrides: list[str], device: str, cap: int = 0) -> dict:
    """`measure` in a fresh process: DeepSpeed's engines keep global state, so one per process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, __file__, "--in-process", "--device", device, "--cap", str(cap), shlex.join(overrides)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{overrides}: exit {result.returncode}: {result.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help='each a quoted list of overrides: "model.preset=nano ..."')
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    parser.add_argument("--cap", type=int, default=0, help="GPU: limit the process to this many bytes")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        from gptcli.train.engine import prepare_environment
        from gptcli.train.launching.importing import import_deepspeed

        logging.disable(logging.WARNING)
        prepare_environment(args.device)
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
        print(json.dumps(measure(shlex.split(args.configs[0]), args.device, args.cap)))
        return
    for config in args.configs:
        row = run_one(shlex.split(config), args.device, args.cap)
        if args.json:
            print(json.dumps(row))
            continue
        cells = [f"{phase} {row['measured'][phase] / 2**20:.1f} MiB, planned {row['planned'][phase] / 2**20:.1f} "
                 f"({row['planned'][phase] / row['measured'][phase] - 1:+.1%})" for phase in row["measured"]]
        print(f"{config}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
