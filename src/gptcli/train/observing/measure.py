"""What a run measures of itself, to hold the plan against: its peak memory (per step into metrics.jsonl,
and the largest over the ranks into RUN/measured.json at each checkpoint) and its speed (the median over
the steps logged). `gpt inspect-params --project P` puts the plan beside it (planner/measured.py)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Optional

import torch

from ...planner.measured import Measurement, write_measurement

# The steps whose speed is left out of the median: the first pays for warm-up, allocation and compilation.
WARMUP_STEPS = 1


def resident_peak() -> Optional[int]:
    """This process's peak resident set in bytes: VmHWM from /proc/self/status (Linux), else getrusage's
    ru_maxrss (kilobytes on Linux); None when neither can be read."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError, ValueError):
        return None


def memory_record(device: str) -> dict:
    """This rank's peak memory so far, for a step's record: CUDA's peak of allocated and of reserved bytes,
    or the CPU process's peak resident set."""
    if device == "cuda":
        return {"memory_peak": torch.cuda.max_memory_allocated(), "memory_reserved_peak": torch.cuda.max_memory_reserved()}
    return {"memory_peak": resident_peak()}


def largest_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Each value's maximum over the ranks (one all-reduce on the engine's device; every rank calls it)."""
    import deepspeed.comm as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(value) for value in tensor.tolist()]


def median_after_warmup(values: list[float]) -> Optional[float]:
    kept = values[WARMUP_STEPS:] or values
    return statistics.median(kept) if kept else None


def record(run) -> None:
    """Every rank: the peaks, the largest over the ranks; rank 0 writes RUN/measured.json with the speed of
    the steps it logged and the settings they hold for. `run`: train/loop.Run."""
    peaks = memory_record(run.device)
    ordered = ["memory_peak", "memory_reserved_peak"] if run.device == "cuda" else ["memory_peak"]
    largest = dict(zip(ordered, largest_over_ranks([peaks[key] or 0 for key in ordered],
                                                              torch.device(run.engine.device)), strict=True))
    if run.rank != 0:
        return
    layout, project = run.layout, run.project
    speed = median_after_warmup(run.speeds)
    measurement = Measurement(
        device=run.device, ranks=layout.world_size, precision=run.precision, zero_stage=project.deepspeed.zero_stage,
        micro_batch=layout.micro_batch_size, grad_accum_steps=layout.grad_accum_steps, seq_len=layout.seq_len,
        activation_checkpointing=project.train.activation_checkpointing, model_fingerprint=project.model.fingerprint(),
        steps=max(0, len(run.speeds) - WARMUP_STEPS) or len(run.speeds), tokens_per_s=speed,
        flops_per_token=run.flops_per_token,
        device_name=torch.cuda.get_device_name() if run.device == "cuda" else "cpu",
        mfu=(run.flops_per_token * speed / (run.peak * layout.world_size)) if speed and run.peak else None,
        peak_allocated=largest["memory_peak"] if run.device == "cuda" else None,
        peak_reserved=largest.get("memory_reserved_peak"), peak_rss=largest["memory_peak"] if run.device == "cpu" else None)
    write_measurement(run.run_dir, measurement)
