"""GPT-2 tokenizer sources: tiktoken's cache, a local vocab dir (both file-name pairs), a .tiktoken file."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import assert_user_error, gpt_env, run_gpt
from gptcli.errors import GptError
from gptcli.tokenizer import load_tokenizer

HELLO = "Hello, I'm a language model,"
HELLO_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # GPT-2's ids, as in HF's model card example

# Text that exercises the pre-tokenizer's corners: contractions, digits, runs of spaces, non-Latin text,
# emoji (multi-byte), and special-token text that must be encoded as plain text.
TRICKY = ("It's 2024 — they'll've  gone.\n\n\tTabs   and  spaces  \r\n日本語のテキスト 🚀🚀 ÿ"
          " <|endoftext|> done  \n")


@pytest.fixture(scope="module")
def reference():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def test_known_sentence_ids(reference):
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.encode(HELLO) == HELLO_IDS
    assert tokenizer.decode(HELLO_IDS) == HELLO
    assert (tokenizer.vocab_size, tokenizer.eot_id) == (50257, 50256)


@pytest.fixture
def hf_named_vocab(tmp_path, gpt2_vocab):
    """A vocab dir with Hugging Face's names, built from OpenAI's files at test time."""
    directory = tmp_path / "hf_vocab"
    directory.mkdir()
    shutil.copyfile(gpt2_vocab / "encoder.json", directory / "vocab.json")
    shutil.copyfile(gpt2_vocab / "vocab.bpe", directory / "merges.txt")
    return directory


@pytest.fixture
def openai_named_vocab(tmp_path, gpt2_vocab):
    directory = tmp_path / "openai_vocab"
    directory.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(gpt2_vocab / name, directory / name)
    return directory


@pytest.mark.parametrize("source", ["openai_named_vocab", "hf_named_vocab", "tiktoken_file"])
def test_local_sources_equal_the_cache(source, reference, request, corpus, gpt2_vocab):
    if source == "tiktoken_file":
        vocab = gpt2_vocab / "r50k_base.tiktoken"
    else:
        vocab = request.getfixturevalue(source)
    local = load_tokenizer("gpt2", str(vocab))
    cached = load_tokenizer("gpt2")
    assert local.fingerprint == cached.fingerprint
    text = corpus.read_text()[:200_000] + TRICKY
    assert local.encode(text) == reference.encode_ordinary(text)
    assert local.encode(HELLO) == HELLO_IDS
    assert local.decode(local.encode(TRICKY)) == TRICKY


def test_special_token_text_is_plain_text(reference):
    ids = load_tokenizer("gpt2").encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert ids == reference.encode_ordinary("a<|endoftext|>b")


def test_mismatched_vocab_files_are_refused(tmp_path, gpt2_vocab):
    directory = tmp_path / "bad"
    directory.mkdir()
    shutil.copyfile(gpt2_vocab / "encoder.json", directory / "encoder.json")
    merges = (gpt2_vocab / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    (directory / "vocab.bpe").write_text("\n".join(merges[:-10]) + "\n", encoding="utf-8")
    with pytest.raises(GptError, match="do not belong together"):
        load_tokenizer("gpt2", str(directory))


def test_missing_tokenizer_offline_is_one_clear_sentence(tmp_path, corpus):
    empty_cache = tmp_path / "empty_cache"
    empty_cache.mkdir()
    # No cache (tiktoken's or gptcli's) and no network: tiktoken cannot fetch its files. Point its download at an unroutable
    # local port so the test is offline even on a machine that has a network.
    result = run_gpt("prepare", corpus, "--out", tmp_path / "out",
                     env={"TIKTOKEN_CACHE_DIR": str(empty_cache), "GPTCLI_CACHE_DIR": str(empty_cache),
                          "HTTPS_PROXY": "http://127.0.0.1:9",
                          "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}, cwd=tmp_path)
    assert_user_error(result, "Could not load the GPT-2 vocabulary", "TIKTOKEN_CACHE_DIR", "--vocab-dir")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_vocab_dir_option_works_without_cache(tmp_path, corpus, openai_named_vocab):
    empty_cache = tmp_path / "empty_cache"
    empty_cache.mkdir()
    result = run_gpt("prepare", corpus, "--out", tmp_path / "out", "--vocab-dir", openai_named_vocab,
                     "--workers", "1", "--json", env={"TIKTOKEN_CACHE_DIR": str(empty_cache), "GPTCLI_CACHE_DIR": str(empty_cache)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert load_tokenizer("gpt2").fingerprint in manifest


def test_encode_each_equals_encode_including_lone_surrogates():
    """encode_each skips tiktoken's wrapper for speed; it must give the same ids, also for text with a lone
    surrogate (possible from a JSON "\\ud800" escape), which the BPE core refuses and the wrapper repairs."""
    from gptcli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    texts = ["Hello, I'm a language model,", "  indented\tline ", "a\ud800b", "", "naïve café 東京"]
    assert tokenizer.encode_each(texts) == [tokenizer.encode(text) for text in texts]
    assert tokenizer.encode_each(texts[:2]) == [tokenizer.encode(text) for text in texts[:2]]


def test_tokenizer_modules_depend_one_way():
    """tokenizer.py builds on openai_bpe.py (the GPT-1 algorithm) and tokenizer_files.py (the file formats);
    neither of those imports tokenizer.py, at module level or inside a function, so there is no cycle."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import gptcli

    package = Path(gptcli.__file__).parent
    for module in ("openai_bpe", "tokenizer_files"):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= {"__future__", "errors", "typing", "pathlib"}, (module, imported)
        check = f"import sys, gptcli.{module}; assert 'gptcli.tokenizer' not in sys.modules"
        assert subprocess.run([sys.executable, "-c", check], env=gpt_env()).returncode == 0, module
    assert subprocess.run([sys.executable, "-c", "import gptcli.tokenizer"], env=gpt_env()).returncode == 0


@pytest.mark.parametrize("fault, fragment", [
    ("merge line", "merges.txt line 3 is not `left right`"),
    ("foreign merge", "makes 1 tokens that"),
    ("not byte-level", "not a byte-level BPE vocabulary"),
    ("not a map", "is not a vocabulary (a JSON object of token → id)"),
])
def test_damaged_vocabulary_files_are_named(tmp_path, gpt2_vocab, fault, fragment):
    """GPT-2 and GPT-1 vocab.json + merges.txt go through one reader, so both get the same checks."""
    import json

    directory = tmp_path / "vocab"
    directory.mkdir()
    vocab = json.loads((gpt2_vocab / "encoder.json").read_text(encoding="utf-8"))
    merges = (gpt2_vocab / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    if fault == "merge line":
        merges[2] = "three parts here"
    elif fault == "foreign merge":
        merges[5] = "Ġ zzzzqqq"
    elif fault == "not byte-level":
        vocab["東京"] = len(vocab)
        merges.append("東 京")
        vocab["東"], vocab["京"] = len(vocab), len(vocab) + 1
    else:
        vocab = list(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    with pytest.raises(GptError, match=re.escape(fragment)):
        load_tokenizer("gpt2", str(directory))


# --- gptcli's cache of tiktoken's GPT-2 ranks ------------------------------------------------------------------


def test_the_cache_constants_are_those_of_tiktokens_gpt2_ranks(reference):
    import hashlib

    from gptcli import tokenizer
    from gptcli.tokenizer_files import tiktoken_bytes

    ranks = reference._mergeable_ranks
    assert hashlib.sha256(tiktoken_bytes(ranks)).hexdigest() == tokenizer.GPT2_TIKTOKEN_SHA256
    special = {tokenizer.ENDOFTEXT: tokenizer.GPT2_EOT_ID}
    assert tokenizer.ranks_fingerprint("gpt2", ranks, special) == tokenizer.GPT2_FINGERPRINT


def fresh_load(monkeypatch, cache):
    monkeypatch.setenv("GPTCLI_CACHE_DIR", str(cache))
    load_tokenizer.cache_clear()
    try:
        return load_tokenizer("gpt2")
    finally:
        load_tokenizer.cache_clear()


def test_the_first_load_keeps_the_ranks_and_the_next_reads_them_with_equal_results(reference, monkeypatch, tmp_path):
    from gptcli import tokenizer as module

    cache = tmp_path / "cache"
    first = fresh_load(monkeypatch, cache)
    kept = cache / module.RANKS_CACHE_FILE
    assert kept.is_file() and not list(cache.glob(".*.tmp"))
    monkeypatch.setattr(module, "_gpt2_ranks_from_tiktoken", lambda: pytest.fail("the cache was not used"))
    second = fresh_load(monkeypatch, cache)
    assert second.fingerprint == first.fingerprint == module.GPT2_FINGERPRINT
    assert second.encode(TRICKY) == first.encode(TRICKY) == reference.encode_ordinary(TRICKY)
    assert second.backend._mergeable_ranks == reference._mergeable_ranks


@pytest.mark.parametrize("damage", ["truncated", "one rank changed"])
def test_a_cache_that_is_not_exactly_gpt2s_ranks_is_ignored_and_rewritten(reference, monkeypatch, tmp_path, damage):
    from gptcli import tokenizer as module

    cache = tmp_path / "cache"
    fresh_load(monkeypatch, cache)
    kept = cache / module.RANKS_CACHE_FILE
    data = kept.read_bytes()
    kept.write_bytes(data[: len(data) // 2] if damage == "truncated" else data.replace(b"IQ== 0\n", b"IQ== 1\n", 1))
    tokenizer = fresh_load(monkeypatch, cache)  # rebuilt from tiktoken: the damaged copy is never read as ranks
    assert tokenizer.encode(TRICKY) == reference.encode_ordinary(TRICKY)
    assert kept.read_bytes() == data


def test_an_unwritable_cache_dir_is_no_error(reference, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tokenizer = fresh_load(monkeypatch, blocker / "cache")  # the cache dir cannot be created under a file
    assert tokenizer.encode(HELLO) == HELLO_IDS
