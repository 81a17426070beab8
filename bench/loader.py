"""Benchmark the training loader: a mixture of 8 sources against one prepared dir, in the same run.

    python bench/loader.py [--tokens 40000000] [--steps 200] [--repeat 5] [--micro 8] [--seq-len 1024] [--accum 4]

Both read the same amount of data from shards written under /tmp (random GPT-2 ids, uint16): one dir of
`--tokens` tokens, and 8 dirs of uneven sizes that add up to the same, mixed with uneven weights (30, 20, 15,
12, 10, 7, 4, 2: a period of 100 windows). The time of a step is what the loader spends handing out one
optimizer step's micro batches (`--accum` of `--micro` windows of `--seq-len` + 1 tokens each, inputs and
targets as int64 tensors, and its position after each), on one rank, as the training loop's read-ahead
thread calls it. The two ways are
interleaved and each one's best of `--repeat` runs of `--steps` steps counts (the least disturbed on a
shared machine), as wall time and as this thread's CPU time (which other processes on a loaded machine do
not inflate); the load average before and after is printed. Target: the mixture within 5% of one dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gptcli.batch import BatchLayout  # noqa: E402
from gptcli.config import project_from_dict  # noqa: E402
from gptcli.data.shards import ShardWriter, write_manifest  # noqa: E402
from gptcli.data.source import open_source  # noqa: E402

WEIGHTS = [30, 20, 15, 12, 10, 7, 4, 2]
SIZES = [0.22, 0.18, 0.15, 0.13, 0.11, 0.09, 0.07, 0.05]  # of --tokens, each source's share of the data
SHARD_TOKENS = 10_000_000
VOCAB = 50257


def write_dir(directory: Path, tokens: int, seed: int) -> Path:
    """A prepared dir of `tokens` random ids in shards of SHARD_TOKENS, with its manifest."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    records = []
    for number, start in enumerate(range(0, tokens, SHARD_TOKENS)):
        ids = rng.integers(0, VOCAB, min(SHARD_TOKENS, tokens - start), dtype=np.uint16)
        with ShardWriter(directory / f"train_{number:06d}.bin", VOCAB, "gpt2:bench") as writer:
            writer.write(ids)
            record = writer.close()
        records.append({"file": record.file, "split": "train", "tokens": record.tokens, "sha256": record.sha256,
                        "max_id": record.max_id})
    write_manifest(directory, {"shards": records, "tokenizer": {"name": "gpt2", "fingerprint": "gpt2:bench",
                                                                 "vocab_size": VOCAB, "eot_id": 50256}})
    return directory


def time_steps(loader, layout: BatchLayout, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) per optimizer step of handing out its micro batches."""
    started, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps * layout.grad_accum_steps):
        loader.next_batch()
        loader.state_dict()  # the read-ahead thread keeps the position after every batch (train/prefetch.py)
    return (time.perf_counter() - started) / steps, (time.thread_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--accum", type=int, default=4)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gptcli-bench-loader-"))
    try:
        print(f"cores: {len(os.sched_getaffinity(0))}  load average before: {os.getloadavg()[0]:.2f}")
        one = write_dir(scratch / "one", args.tokens, 0)
        mixture = [{"name": f"s{i}", "dir": str(write_dir(scratch / f"s{i}", int(args.tokens * size), i + 1)),
                    "weight": weight} for i, (size, weight) in enumerate(zip(SIZES, WEIGHTS, strict=True))]
        layout = BatchLayout(args.micro, args.accum, 1, args.seq_len)
        started = time.perf_counter()
        sources = {"one dir": open_source(project_from_dict({"data": {"dir": str(one)}}).data),
                   "8 sources": open_source(project_from_dict({"data": {"sources": mixture}}).data)}
        loaders = {name: source.train_loader(layout, 0, seed=1, shuffle=True) for name, source in sources.items()}
        print(f"opening both, the schedule and the first orders: {time.perf_counter() - started:.2f} s")
        wall = {name: float("inf") for name in loaders}
        cpu = dict(wall)
        for _ in range(args.repeat):
            for name, loader in loaders.items():
                seconds, thread = time_steps(loader, layout, args.steps)
                wall[name], cpu[name] = min(wall[name], seconds), min(cpu[name], thread)
        windows = layout.sequences_per_step
        print(f"\n{args.steps} steps of {windows} windows × {args.seq_len + 1} tokens, best of {args.repeat}")
        print("| loader | ms per step | µs per window | vs one dir | CPU ms per step | CPU vs one dir |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in loaders:
            print(f"| {name} | {wall[name] * 1e3:.3f} | {wall[name] / windows * 1e6:.1f} | "
                  f"{wall[name] / wall['one dir']:.3f}× | {cpu[name] * 1e3:.3f} | {cpu[name] / cpu['one dir']:.3f}× |")
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
