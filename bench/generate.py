"""Generation speed: gptcli's KV-cache sampler vs transformers' `generate`, same weights, same process.

A random GPT-2 124M (the `gpt2` shape), greedy decoding, batch 1, a short prompt: plain, and with
prompt-lookup drafts (--lookahead); then a left-padded batch of four prompts. Each pair produces the
same tokens (checked), so tokens/s compare like for like.

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

from gptcli.generate import SamplingOptions, generate_ids
from hf_twin import hf_gpt2, twin_of


def best_times(repeats: int, runs: dict) -> tuple[dict, dict]:
    """Fastest of `repeats` timings of each run, taken in turns so that load on the machine hits all alike."""
    times = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a busy machine)")
    parser.add_argument("--lookahead", type=int, default=4, help="draft tokens for the prompt-lookup run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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

    lookahead = SamplingOptions(max_new_tokens=new, temperature=0, lookahead=args.lookahead)

    def run_lookahead():
        with torch.inference_mode():
            return generate_ids(ours, [prompt], lookahead, eot_id=None)[0][0]

    # A batch of four prompts of different lengths, left-padded on both sides.
    batch = [prompt, prompt[:3], prompt[2:9], prompt[5:]]
    width = max(len(p) for p in batch)
    padded = torch.tensor([[50256] * (width - len(p)) + p for p in batch], device=args.device)
    padding_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)

    def run_hf_batch():
        with torch.inference_mode():
            out = hf.generate(padded, attention_mask=padding_mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=50256)
        return out[:, width:].tolist()

    def run_ours_batch():
        with torch.inference_mode():
            return generate_ids(ours, batch, options, eot_id=None)[0]

    run_hf(), run_ours()  # warm-up
    seconds, tokens = best_times(args.repeats, {"hf": run_hf, "ours": run_ours, "lookahead": run_lookahead,
                                                "hf_batch": run_hf_batch, "ours_batch": run_ours_batch})
    hf_seconds, our_seconds, lookahead_seconds = seconds["hf"], seconds["ours"], seconds["lookahead"]
    hf_tokens, our_tokens, lookahead_tokens = tokens["hf"], tokens["ours"], tokens["lookahead"]
    report = {
        "device": args.device, "threads": torch.get_num_threads(), "new_tokens": new, "prompt_tokens": len(prompt),
        "same_tokens": hf_tokens == our_tokens == lookahead_tokens,
        "distinct_generated_tokens": len(set(our_tokens)),
        "transformers_tokens_per_s": round(new / hf_seconds, 2), "gptcli_tokens_per_s": round(new / our_seconds, 2),
        "speedup": round(hf_seconds / our_seconds, 3),
        f"gptcli_lookahead{args.lookahead}_tokens_per_s": round(new / lookahead_seconds, 2),
        "speedup_lookahead": round(hf_seconds / lookahead_seconds, 3),
        "batch4_same_tokens": tokens["hf_batch"] == tokens["ours_batch"],
        "batch4_transformers_tokens_per_s": round(4 * new / seconds["hf_batch"], 2),
        "batch4_gptcli_tokens_per_s": round(4 * new / seconds["ours_batch"], 2),
        "batch4_speedup": round(seconds["hf_batch"] / seconds["ours_batch"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
