"""A GPT-1 style BPE vocabulary trained by the tests themselves (test_openai_bpe.py, test_hf.py): the merges and
the vocabulary files openai-gpt's tokenizer reads."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path


def train_bpe(text: str, merges_wanted: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A plain BPE trainer (Sennrich et al. 2016) over lower-cased words split from punctuation, with
    `</w>` on each word's last symbol: the same recipe that made openai-gpt's 40,000 merges."""
    words = collections.Counter(re.findall(r"\w+|[^\w\s]", text.lower()))
    splits = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in words}
    base = sorted({symbol for symbols in splits.values() for symbol in symbols})
    merges = []
    for _ in range(merges_wanted):
        pairs = collections.Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    vocab = {symbol: index for index, symbol in enumerate(base)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def write_vocabulary(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return directory
