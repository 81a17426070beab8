"""Attention patterns' cost: a training forward and backward pass of each pattern against plain causal.

One model shape, the same weights for every pattern, windows of T tokens holding documents of a few hundred
tokens (end-of-text tokens between them), each pattern under the objective it is trained with (prefix under
prefix_lm, conditional under conditional, bidirectional under masked_lm, the others under next_token).
A step here is the objective's batch (its draws) and the forward and backward pass. Times are taken in turns, best of --repeats, so that load on the machine hits every pattern alike; the
ratio is each pattern's time over causal's in the same run. On CUDA the patterns with a mask_mod run as
FlexAttention block masks (model.py); on the CPU every pattern but causal is a dense mask.

    python bench/attention.py [--seq-len 1024] [--layers 6] [--width 384] [--heads 6] [--repeats 3]
                              [--device cpu] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptcli.attention import AttentionPattern
from gptcli.config import project_from_dict
from gptcli.model import build_model
from gptcli.objectives import TRAIN_STREAM, keys_for, objective_spec

EOT = 50256


def strided(context):
    """A user's mask function (the Sparse Transformer's strided pattern, stride 128): causal, the 128 keys
    before each query and every 128th before those."""
    distance = context.distance
    return (distance >= 0) & ((distance < 128) | (distance % 128 == 0))


# pattern → the objective it is trained with
PATTERNS = {"causal": "next_token", "document": "next_token", "sliding_window": "next_token",
            "document_sliding_window": "next_token", "user (strided)": "next_token", "prefix": "prefix_lm",
            "conditional": "conditional", "bidirectional": "masked_lm"}


def windows(batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq_len + 1) random token ids, documents of 100 to 600 tokens ended by end-of-text tokens."""
    tokens = torch.randint(0, EOT, (batch, seq_len + 1), generator=generator)
    for row in range(batch):
        at = 0
        while True:
            at += int(torch.randint(100, 600, (1,), generator=generator))
            if at > seq_len:
                break
            tokens[row, at] = EOT
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a busy machine)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads, "block_size": args.seq_len,
             "sliding_window": 256}
    generator = torch.Generator().manual_seed(0)
    data = windows(args.batch, args.seq_len, generator).to(device)
    runs = {name: prepared(name, objective, shape, data, device) for name, objective in PATTERNS.items()}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    best = {name: min(found) for name, found in times.items()}
    tokens = args.batch * args.seq_len
    rows = [{"pattern": name, "objective": PATTERNS[name], "seconds": best[name], "tokens_per_s": tokens / best[name],
             "time_vs_causal": best[name] / best["causal"]} for name in runs]
    if args.json:
        print(json.dumps({"shape": shape, "batch": args.batch, "device": str(device), "threads": args.threads,
                          "torch": torch.__version__, "patterns": rows}, indent=2))
        return
    print(f"T = {args.seq_len}, batch {args.batch}, {args.layers} layers × {args.width} wide, {args.device}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(f"{'pattern':<26} {'objective':<12} {'tokens/s':>10} {'time ÷ causal':>14}")
    for row in rows:
        print(f"{row['pattern']:<26} {row['objective']:<12} {row['tokens_per_s']:>10.1f} {row['time_vs_causal']:>13.2f}×")


def prepared(name: str, objective_name: str, shape: dict, data: torch.Tensor, device: torch.device):
    """One training forward and backward of `name` under its objective, as a function of no arguments."""
    pattern = AttentionPattern(name, "", strided) if name.startswith("user") else name
    config = project_from_dict({"model": {**shape, "attention": "causal"}}).model
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    objective = objective_spec(objective_name)
    keys = keys_for(TRAIN_STREAM, 0, len(data), 0)

    def run() -> None:
        batch = objective.batch(data, keys, 0)  # the draws are part of a step's work
        _, loss = model(batch.inputs, batch.targets, attention=pattern, return_logits=False, **batch.model_inputs())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


if __name__ == "__main__":
    main()
