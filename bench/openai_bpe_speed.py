"""GPT-1 tokenizer throughput: gptcli.openai_bpe against transformers' OpenAIGPTTokenizer (Rust
`tokenizers` backend), same text, same vocabulary, measured in the same run; ids must be equal.

    python bench/openai_bpe_speed.py [--merges 300] [--text ../shared/corpora/tinyshakespeare.txt]

No openai-gpt vocabulary ships with the repo and this machine is offline, so the vocabulary is trained
on the text's first 100 kB with the test suite's BPE trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]


def main() -> None:
    from transformers import OpenAIGPTTokenizer

    from gptcli.tokenizer import load_tokenizer
    from test_openai_bpe import train_bpe, write_vocabulary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared/corpora/tinyshakespeare.txt")
    parser.add_argument("--merges", type=int, default=300)
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    vocab, merges = train_bpe(text[:100_000], args.merges)
    vocab["<unk>"] = len(vocab)
    vocab_dir = write_vocabulary(Path(tempfile.mkdtemp(prefix="openai-vocab-")), vocab, merges)
    lines = text.splitlines()
    ours, reference = load_tokenizer("openai-gpt", str(vocab_dir)), OpenAIGPTTokenizer.from_pretrained(str(vocab_dir))
    start = time.perf_counter()
    ours_ids = ours.encode_batch(lines)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference_ids = reference(lines, add_special_tokens=False)["input_ids"]
    reference_seconds = time.perf_counter() - start
    print(json.dumps({"bytes": len(text.encode()), "tokens": sum(map(len, ours_ids)), "ids_equal": ours_ids == reference_ids,
                      "gptcli_seconds": round(ours_seconds, 2), "transformers_seconds": round(reference_seconds, 2),
                      "gptcli_mb_per_s": round(len(text.encode()) / ours_seconds / 1e6, 2),
                      "speed_vs_transformers": round(reference_seconds / ours_seconds, 2)}, indent=2))


if __name__ == "__main__":
    main()
