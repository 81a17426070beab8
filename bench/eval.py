"""Eval speed: gptcli's sliding-window scorer vs a transformers forward over the same windows, one process.

A random GPT-2 124M (the `gpt2` shape, 1024 context), text from ../shared/corpora/tinyshakespeare.txt,
stride 512. The reference is the transformers perplexity guide's loop: one `model(input_ids, labels=...)`
per window. Both compute the same perplexity (checked), so scored tokens/s compare like for like.

    python bench/eval.py [--tokens 4096] [--stride 512] [--batch-size 8] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from gptcli.evaluate import evaluate_sequences, plan_windows
from gptcli.tokenizer import load_tokenizer
from hf_twin import hf_gpt2, twin_of

SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpora" / "tinyshakespeare.txt"
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def transformers_windows(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The guide's loop; returns (its perplexity, tokens scored)."""
    nll_sum, n_tokens = 0.0, 0
    for window in plan_windows(ids.size(1), context, stride):
        input_ids = ids[:, window.begin:window.end]
        target_ids = input_ids.clone()
        target_ids[:, :-window.labels] = -100
        with torch.inference_mode():
            loss = model(input_ids, labels=target_ids).loss
        nll_sum += loss.item() * (window.labels - 1)
        n_tokens += window.scored
    return math.exp(nll_sum / sum(w.labels - 1 for w in plan_windows(ids.size(1), context, stride))), n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a busy machine)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("gpt2")
    ids = tokenizer.encode(CORPUS.read_text()[: args.tokens * 8])[: args.tokens]
    hf = hf_gpt2(seed=0, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    ours = twin_of(hf).to(args.device)
    hf = hf.to(args.device)
    tensor = torch.tensor([ids], device=args.device)

    hf_times, our_times = [], []
    for _ in range(args.repeats):  # in turns, so that load on the machine hits both alike
        start = time.perf_counter()
        hf_ppl, hf_tokens = transformers_windows(hf, tensor, 1024, args.stride)
        hf_times.append(time.perf_counter() - start)
        result = evaluate_sequences(ours, tokenizer, [np.array(ids)], source="bench", stride=args.stride,
                                    batch_size=args.batch_size)
        our_times.append(result.seconds)
    hf_seconds, our_seconds = min(hf_times), min(our_times)
    report = {
        "device": args.device, "threads": torch.get_num_threads(), "tokens": len(ids), "stride": args.stride,
        "batch_size": args.batch_size, "windows": result.windows,
        "same_perplexity": abs(result.hf_perplexity / hf_ppl - 1) < 1e-4,
        "transformers_tokens_per_s": round(hf_tokens / hf_seconds, 1),
        "gptcli_tokens_per_s": round(result.tokens / our_seconds, 1),
        "speedup": round(hf_seconds / our_seconds * result.tokens / hf_tokens, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
