"""Perplexity against the transformers sliding-window recipe; bits per byte by hand; shards; the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_user_error, run_gpt
from gptcli.evaluate import evaluate_sequences, plan_windows
from hf_twin import hf_gpt2, twin_of
from shard_fixture import write_shard_dir

CONTEXT = 64


@pytest.fixture(scope="module")
def tokenizer():
    from gptcli.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def pair():
    hf = hf_gpt2(seed=1, vocab_size=50257, block_size=CONTEXT, n_layer=2, n_head=4, n_embd=64)
    return hf, twin_of(hf)


@pytest.fixture(scope="module")
def text(tokenizer, corpus):
    """About 1,500 characters, cut where the recipe's last window scores something (not 0 or 1 tokens
    past a multiple of the context)."""
    text = corpus.read_text()
    return next(text[:chars] for chars in range(1500, 1600) if len(tokenizer.encode(text[:chars])) % CONTEXT > 1)


@pytest.fixture(scope="module")
def model_dir(pair, tokenizer, tmp_path_factory):
    from gptcli.modeldir import save_model_dir

    return save_model_dir(tmp_path_factory.mktemp("eval") / "model", pair[1], tokenizer)


def transformers_recipe(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, float]:
    """The guide's loop, with the model's own loss over -100 labels. Returns (its perplexity, and the exact
    token-weighted perplexity from the same windows' summed per-token losses)."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, exact_sum, exact_count, prev_end_loc = 0.0, 0, 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)  # the label shift drops one
        nll_sum += outputs.loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        shifted = target_ids[:, 1:]
        exact_sum += F.cross_entropy(outputs.logits[0, :-1].double(), shifted[0], ignore_index=-100,
                                     reduction="sum").item()
        exact_count += (shifted != -100).sum().item()
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), math.exp(exact_sum / exact_count)


@pytest.mark.slow
@pytest.mark.parametrize("stride", [CONTEXT, CONTEXT // 2, 24])
def test_perplexity_equals_transformers_recipe(pair, tokenizer, text, stride):
    hf, ours = pair
    ids = tokenizer.encode(text)
    hf_ppl, exact_ppl = transformers_recipe(hf, torch.tensor([ids]), CONTEXT, stride)
    result = evaluate_sequences(ours, tokenizer, [np.array(ids)], source="text", stride=stride, batch_size=3)
    assert abs(result.hf_perplexity / hf_ppl - 1) <= 1e-4
    assert abs(result.perplexity / exact_ppl - 1) <= 1e-4
    assert result.tokens == (len(ids) - 1 if stride < CONTEXT else len(ids) - 1 - (len(ids) - 1) // CONTEXT)
    if stride == CONTEXT:
        assert result.hf_loss == pytest.approx(result.loss, rel=1e-12)  # no overlap: the two weightings agree


@pytest.mark.slow
def test_batch_size_does_not_change_the_result(pair, tokenizer, text):
    ids = np.array(tokenizer.encode(text))
    one = evaluate_sequences(pair[1], tokenizer, [ids], source="t", stride=16, batch_size=1)
    many = evaluate_sequences(pair[1], tokenizer, [ids], source="t", stride=16, batch_size=7)
    assert many.loss == pytest.approx(one.loss, rel=1e-6) and many.tokens == one.tokens


def test_windows_score_every_token_once():
    for n, stride in [(200, 64), (200, 16), (129, 64), (65, 64), (10, 3)]:
        windows = plan_windows(n, CONTEXT, stride)
        scored = [t for w in windows for t in range(w.end - w.scored, w.end)]
        assert len(scored) == len(set(scored))
        if stride < CONTEXT:
            assert sorted(scored) == list(range(1, n))
        assert all(w.end - w.begin <= CONTEXT and w.scored < w.end - w.begin for w in windows)


def test_bits_per_byte_by_hand(tokenizer):
    """A model with all-zero logits predicts uniformly: every token costs ln(V) nats exactly."""
    from gptcli.config import project_from_dict
    from gptcli.model import build_model

    model = build_model(project_from_dict({"model": {"preset": "nano"}}).model).eval()
    with torch.no_grad():
        model.wte.weight.zero_()  # tied head: logits = hidden · 0 = 0
    text = "Hello wörld"  # 12 UTF-8 bytes; the first token "Hello" (5 bytes) is not scored
    ids = tokenizer.encode(text)
    assert tokenizer.decode_bytes(ids[:1]) == b"Hello"
    result = evaluate_sequences(model, tokenizer, [np.array(ids)], source="t")
    scored = len(ids) - 1
    assert result.bytes == 12 - 5
    assert result.loss == pytest.approx(math.log(50257), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(scored * math.log2(50257) / 7, rel=1e-6)


# --- the command line -------------------------------------------------------------------------------------


def write_val_shard(directory, tokenizer, ids):
    write_shard_dir(directory, [("train", ids[:100]), ("val", ids)], vocab_size=tokenizer.vocab_size,
                    fingerprint=tokenizer.fingerprint, eot_id=50256)


@pytest.mark.slow
def test_cli_text_and_project_shards_agree_with_the_recipe(pair, tokenizer, text, model_dir, tmp_path):
    ids = tokenizer.encode(text)
    hf_ppl, exact_ppl = transformers_recipe(pair[0], torch.tensor([ids]), CONTEXT, 32)
    (tmp_path / "wiki.txt").write_text(text)
    by_text = run_gpt("eval", "--checkpoint", model_dir, "--text", tmp_path / "wiki.txt", "--stride", "32", "--json")
    assert by_text.returncode == 0, by_text.stderr
    report = json.loads(by_text.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(report)
    assert abs(report["perplexity"] / exact_ppl - 1) <= 1e-4 and abs(report["hf_perplexity"] / hf_ppl - 1) <= 1e-4
    assert report["tokens"] == len(ids) - 1 and report["bytes"] == len(text.encode()) - len(tokenizer.decode_bytes(ids[:1]))

    write_val_shard(tmp_path / "shards", tokenizer, ids)
    (tmp_path / "run.toml").write_text('[project]\nout_dir = "run"\n[data]\ndir = "shards"\n[eval]\nstride = 32\n')
    import shutil

    shutil.copytree(model_dir, tmp_path / "run" / "model")
    by_shards = run_gpt("eval", "--json", cwd=tmp_path)
    assert by_shards.returncode == 0, by_shards.stderr
    assert json.loads(by_shards.stdout)["perplexity"] == pytest.approx(report["perplexity"], rel=1e-6)
    capped = json.loads(run_gpt("eval", "--json", "--max-tokens", "40", "--split", "train", cwd=tmp_path).stdout)
    assert capped["tokens"] == 40


@pytest.mark.slow
def test_cli_bad_input(model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "t.txt").write_text("Some text to score, long enough.")
    text = ("--text", str(tmp_path / "t.txt"))
    assert_user_error(run_gpt("eval", "--checkpoint", tmp_path / "nope", *text), "nope", "does not exist")
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, "--text", tmp_path / "empty.txt"), "empty")
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, *text, "--stride", "65"), "stride 65", "context of 64")
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, *text, "--stride", "-1"),
                      "eval.stride must be 0 or more, not -1")
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, "--split", "test"),
                      'eval.split must be one of "val", "train", not "test"')
    both = run_gpt("eval", "--checkpoint", model_dir, *text, "--dataset", "wikitext")
    assert both.returncode == 2 and "give --text or --dataset, not both" in " ".join(both.stderr.split())
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, cwd=tmp_path), "data", "does not exist")


@pytest.mark.slow
def test_cli_dataset_equals_the_joined_text(model_dir, tmp_path):
    import datasets

    records = ["First record of the set, with a few words.", "Second record: more words to score here.",
               "Third and last record."]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": records})}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "joined.txt").write_text("\n\n".join(records))
    by_dataset = run_gpt("eval", "--checkpoint", model_dir, "--dataset", tmp_path / "ds", "--json")
    assert by_dataset.returncode == 0, by_dataset.stderr
    by_text = run_gpt("eval", "--checkpoint", model_dir, "--text", tmp_path / "joined.txt", "--json")
    assert json.loads(by_dataset.stdout)["perplexity"] == json.loads(by_text.stdout)["perplexity"]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, "--dataset", "no-such/dataset-here", env=offline),
                      "no-such/dataset-here needs the Hugging Face Hub")


@pytest.mark.gpu
def test_cuda_eval_matches_cpu(pair, tokenizer, text):
    ids = np.array(tokenizer.encode(text))
    cpu = evaluate_sequences(pair[1], tokenizer, [ids], source="t", stride=32)
    cuda = evaluate_sequences(twin_of(pair[0]).cuda(), tokenizer, [ids], source="t", stride=32)
    assert cuda.loss == pytest.approx(cpu.loss, rel=1e-4) and cuda.tokens == cpu.tokens
    bf16 = evaluate_sequences(twin_of(pair[0]).cuda(), tokenizer, [ids], source="t", stride=32, bf16=True)
    assert bf16.loss == pytest.approx(cpu.loss, rel=2e-2)


def test_shards_of_another_tokenizer_are_refused(tokenizer, tmp_path):
    """Scoring ids made by a different BPE would give a meaningless perplexity: eval refuses them."""
    from types import SimpleNamespace

    from gptcli.config import project_from_dict
    from gptcli.errors import GptError
    from gptcli.evaluate import split_sequences

    other = SimpleNamespace(vocab_size=tokenizer.vocab_size, fingerprint="gpt2:0000000000000000")
    write_val_shard(tmp_path / "shards", other, list(range(200)))
    project = project_from_dict({"data": {"dir": str(tmp_path / "shards")}})
    with pytest.raises(GptError, match="were made with tokenizer gpt2:0000000000000000"):
        split_sequences(project, "val", tokenizer)
    sequences, name = split_sequences(project, "val", other)
    assert len(sequences) == 1 and name == f"{tmp_path / 'shards'} (val)"


def test_a_shard_overwritten_with_ids_outside_the_vocabulary_is_one_sentence(tokenizer, tmp_path):
    """Ids overwritten with 65535 after prepare (the manifest still says 50256): training named the shard,
    eval said "internal error"."""
    import numpy as np

    from gptcli.config import project_from_dict
    from gptcli.errors import GptError
    from gptcli.evaluate import split_sequences

    write_val_shard(tmp_path / "shards", tokenizer, list(range(200)))
    shard = tmp_path / "shards" / "val_000001.bin"
    data = bytearray(shard.read_bytes())
    data[-20:] = np.full(10, 65535, dtype=np.uint16).tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(GptError, match="val_000001.bin holds token id 65535, outside the vocabulary of 50,257"):
        split_sequences(project_from_dict({"data": {"dir": str(tmp_path / "shards")}}), "val", tokenizer)


def test_json_has_no_bare_nan(tmp_path, tokenizer, capsys):
    """`gpt eval --json` on NaN weights printed `NaN`, which JSON does not have: null now."""
    from gptcli.cli import emit_json

    emit_json({"loss": float("nan"), "perplexity": float("inf"), "inner": [1.5, float("-inf")], "tokens": 3})
    line = capsys.readouterr().out
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "loss": None, "perplexity": None, "inner": [1.5, None], "tokens": 3}
