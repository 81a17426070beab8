"""Small prepared-shard dirs for the loader and training tests, written with the shard writer directly
from tiktoken-encoded text (what `gpt prepare` produces, without depending on it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptcli.data.shards import ShardWriter, write_manifest
from gptcli.tokenizer import load_tokenizer


def write_shard_dir(directory: Path, shards, *, vocab_size: int, fingerprint: str, name: str = "gpt2",
                    eot_id=None) -> list[dict]:
    """`(split, ids)` pairs as shards `{split}_{number:06d}.bin`, numbered in order, plus their manifest:
    the layout `gpt prepare` writes, without going through it."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for number, (split, tokens) in enumerate(shards):
        with ShardWriter(directory / f"{split}_{number:06d}.bin", vocab_size, fingerprint) as writer:
            writer.write(np.asarray(tokens))
            record = writer.close()
        records.append({"file": record.file, "split": split, "tokens": record.tokens, "sha256": record.sha256,
                        "max_id": record.max_id})
    write_manifest(directory, {"shards": records, "tokenizer": {
        "name": name, "fingerprint": fingerprint, "vocab_size": vocab_size, "eot_id": eot_id}})
    return records


def make_shards(text_path: Path, out_dir: Path, *, shard_tokens: int = 100_000, val_tokens: int = 20_000,
                max_tokens: int = 0) -> Path:
    """Encode `text_path` with GPT-2 BPE; the last `val_tokens` go to val, the rest to train shards."""
    tokenizer = load_tokenizer("gpt2")
    ids = np.array(tokenizer.encode(Path(text_path).read_text()), dtype=np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    splits = {"train": ids[:-val_tokens], "val": ids[-val_tokens:]}
    pieces = [(split, tokens[start:start + shard_tokens])
              for split, tokens in splits.items() for start in range(0, len(tokens), shard_tokens)]
    write_shard_dir(out_dir, pieces, vocab_size=tokenizer.vocab_size, fingerprint=tokenizer.fingerprint,
                    name=tokenizer.name, eot_id=tokenizer.eot_id)
    return out_dir
