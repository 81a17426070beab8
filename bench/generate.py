"""Generation speed: gptcli's KV-cache sampler vs transformers' `generate`, same weights, same process.

A random GPT-2 124M (the `gpt2` shape), greedy decoding, batch 1, a short prompt. Both produce the same
tokens (checked), so tokens/s compare like for like.

    python bench/generate.py [--new-tokens 128] [--repeats 3] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hf_twin import hf_gpt2, twin_of  # noqa: E402

from gptcli.generate import SamplingOptions, generate_ids  # noqa: E402


def best_of(repeats: int, run) -> tuple[float, list[int]]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # GPT-2 124M shape: 50257 tokens, 1024 positions, 12 layers, 12 heads, 768 wide.
    hf = hf_gpt2(seed=0, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768).to(args.device)
    ours = twin_of(hf.cpu()).to(args.device)
    hf = hf.to(args.device)
    prompt = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]  # "The quick brown fox jumps over the lazy dog."
    new = args.new_tokens
    options = SamplingOptions(max_new_tokens=new, temperature=0)
    ids = torch.tensor([prompt], device=args.device)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=50256)
        return out[0, len(prompt):].tolist()

    def run_ours():
        with torch.inference_mode():
            return generate_ids(ours, [prompt], options, eot_id=None)[0][0]

    run_hf(), run_ours()  # warm-up
    hf_seconds, hf_tokens = best_of(args.repeats, run_hf)
    our_seconds, our_tokens = best_of(args.repeats, run_ours)
    report = {
        "device": args.device, "threads": torch.get_num_threads(), "new_tokens": new, "prompt_tokens": len(prompt),
        "same_tokens": hf_tokens == our_tokens,
        "transformers_tokens_per_s": round(new / hf_seconds, 2), "gptcli_tokens_per_s": round(new / our_seconds, 2),
        "speedup": round(hf_seconds / our_seconds, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
