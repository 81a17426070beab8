"""Small prepared-shard dirs for the loader and training tests, written with the shard writer directly
from tiktoken-encoded tinyshakespeare (what `gpt prepare` produces, without depending on it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptcli.data.shards import ShardWriter, write_manifest
from gptcli.tokenizer import load_tokenizer


def make_shards(text_path: Path, out_dir: Path, *, shard_tokens: int = 100_000, val_tokens: int = 20_000,
                max_tokens: int = 0) -> Path:
    """Encode `text_path` with GPT-2 BPE; the last `val_tokens` go to val, the rest to train shards."""
    tokenizer = load_tokenizer("gpt2")
    ids = np.array(tokenizer.encode(Path(text_path).read_text()), dtype=np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    splits = {"train": ids[:-val_tokens], "val": ids[-val_tokens:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for split, tokens in splits.items():
        for number, start in enumerate(range(0, len(tokens), shard_tokens)):
            with ShardWriter(out_dir / f"{split}_{number:04d}.bin", tokenizer.vocab_size, tokenizer.fingerprint) as w:
                w.write(tokens[start:start + shard_tokens])
                record = w.close()
            records.append({"file": record.file, "split": split, "tokens": record.tokens, "sha256": record.sha256})
    write_manifest(out_dir, {"shards": records, "tokenizer": {
        "name": tokenizer.name, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id}})
    return out_dir
