"""GPT-1's BPE against transformers' OpenAIGPTTokenizer, on a vocabulary this test trains itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bpe_trainer import train_bpe, write_vocabulary
from gptcli.errors import GptError
from gptcli.tokenizer import load_from_model_dir, load_tokenizer

EXTRA_TEXT = [
    "Café déjà vu: naïve coöperation — “quoted” text… and $5.00 / 10% off!",
    "Tabs\tand\nnewlines\r\n and   runs of spaces; CJK 東京 too; emoji 🙂 is unknown.",
    "don't won't can't I'm o'er e'en 'tis — ALL CAPS and MiXeD CaSe; Greek ΟΔΟΣ ends in a capital sigma.",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, corpus) -> Path:
    text = corpus.read_text()[:100_000]
    vocab, merges = train_bpe(text + "\n".join(EXTRA_TEXT).replace("🙂", ""), merges_wanted=300)
    vocab["<unk>"] = len(vocab)
    return write_vocabulary(tmp_path_factory.mktemp("openai_vocab"), vocab, merges)


@pytest.mark.slow
def test_ids_equal_transformers_on_a_corpus_and_edge_cases(vocab_dir, corpus):
    from transformers import OpenAIGPTTokenizer

    reference = OpenAIGPTTokenizer.from_pretrained(str(vocab_dir))
    ours = load_tokenizer("openai-gpt", str(vocab_dir))
    text = corpus.read_text()[300_000:340_000]  # text the vocabulary was not trained on
    lines = [line for line in text.splitlines() if line.strip()] + EXTRA_TEXT
    expected = reference(lines, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(lines) == expected
    assert sum(map(len, expected)) > 5000  # the comparison covered a real amount of text
    assert ours.eot_id is None and ours.name == "openai-gpt"
    assert ours.backend.unknown_symbols > 0  # the emoji became <unk>, as in transformers
    sample = "To be, or not to be: that is the question."
    assert ours.decode(ours.encode(sample)) == reference.decode(reference(sample)["input_ids"])


def test_symbols_outside_the_vocabulary_are_skipped_without_unk(tmp_path):
    vocab, merges = train_bpe("the cat sat on the mat", merges_wanted=5)
    tokenizer = load_tokenizer("openai-gpt", str(write_vocabulary(tmp_path, vocab, merges)))
    assert tokenizer.decode(tokenizer.encode("The cat zzz sat")) == "the cat sat"
    assert tokenizer.backend.unknown_symbols == 3


def test_save_round_trip_keeps_the_fingerprint(vocab_dir, tmp_path):
    tokenizer = load_tokenizer("openai-gpt", str(vocab_dir))
    tokenizer.save(tmp_path)
    again = load_from_model_dir(tmp_path)
    assert again.fingerprint == tokenizer.fingerprint
    assert again.encode("Hath the king's grace?") == tokenizer.encode("Hath the king's grace?")
    assert tokenizer.fingerprint.startswith("openai-gpt:") and len(tokenizer.fingerprint) == len("openai-gpt:") + 16


def test_mismatched_or_missing_files_are_clear_errors(vocab_dir, tmp_path):
    with pytest.raises(GptError, match="needs a vocabulary dir"):
        load_tokenizer("openai-gpt")
    with pytest.raises(GptError, match="vocab.json and merges.txt"):
        load_tokenizer("openai-gpt", str(tmp_path))
    vocab = json.loads((vocab_dir / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({k: v for k, v in list(vocab.items())[:50]}))
    (tmp_path / "merges.txt").write_text((vocab_dir / "merges.txt").read_text())
    with pytest.raises(GptError, match="do not belong together"):
        load_tokenizer("openai-gpt", str(tmp_path))


def test_prepare_with_the_openai_gpt_tokenizer(vocab_dir, tmp_path, corpus):
    """GPT-1 pretraining data: `gpt prepare` with [data] tokenizer = "openai-gpt" writes each document's
    GPT-1 ids back to back (no end-of-text token exists in that vocabulary), fingerprinted as openai-gpt."""
    from conftest import run_gpt
    from gptcli.data.shards import open_prepared

    text = tmp_path / "modules.txt"
    text.write_text(corpus.read_text()[:20_000])
    out = tmp_path / "shards"
    result = run_gpt("prepare", text, "--out", out, "--separator", "blank-line", "--val-fraction", "0",
                     "--vocab-dir", vocab_dir, "--set", 'data.tokenizer="openai-gpt"', "--json")
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer("openai-gpt", str(vocab_dir))
    documents = [p for p in text.read_text().split("\n\n") if p.strip()]
    expected = [i for document in documents for i in tokenizer.encode(document.strip("\n"))]
    prepared = open_prepared(out, verify=True)
    assert prepared.manifest["tokenizer"]["name"] == "openai-gpt"
    assert prepared.fingerprint == tokenizer.fingerprint
    assert np.concatenate([s.tokens for s in prepared.splits["train"]]).tolist() == expected
