"""`gpt prepare`: the tokens written equal tiktoken's, the output does not depend on workers, every input
kind works, bad input is one sentence and leaves nothing behind, interruption never looks complete."""

from __future__ import annotations

import gzip
import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HANG_SECONDS, assert_user_error, gpt_env, run_gpt, wait_until
from gptcli.config import load_project
from gptcli.data.prepare import PrepareOptions, prepare
from gptcli.data.shards import HEADER_BYTES, open_prepared
from gptcli.data.split import validation_mask
from gptcli.errors import GptError

EOT = 50256


@pytest.fixture(scope="module")
def encoding():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def paragraphs(text: str) -> list[str]:
    """blank-line documents, by their documented definition: runs of non-blank lines joined by \\n."""
    groups = itertools.groupby(text.split("\n"), key=lambda line: bool(line.strip()))
    return ["\n".join(lines) for nonblank, lines in groups if nonblank]


def split_streams(documents, encoding, seed, val_fraction):
    """What the shards must hold: each document's ids and one EOT, sent to train or val by the seeded hash."""
    to_val = validation_mask(np.arange(len(documents)), seed, val_fraction)
    streams = {"train": [], "val": []}
    for document, val in zip(documents, to_val, strict=True):
        streams["val" if val else "train"].extend(encoding.encode_ordinary(document) + [EOT])
    return streams


def options(inputs, out, *overrides, **run) -> PrepareOptions:
    """Options as `gpt prepare` builds them: [data] keys through the project's --set mechanism."""
    return PrepareOptions.from_project(load_project(None, [f"data.{o}" for o in overrides]), [str(i) for i in inputs],
                                       out, **run)


def written(directory) -> dict[str, list[int]]:
    data = open_prepared(directory, verify=True)
    return {split: np.concatenate([s.tokens for s in data.splits.get(split, [])] or [np.zeros(0)]).tolist()
            for split in ("train", "val")}


def shard_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


def assert_nothing_written(tmp_path, out_name="out"):
    assert not (tmp_path / out_name).exists()
    assert not list(tmp_path.glob(f".{out_name}.*"))


# --- the tokens are right ---------------------------------------------------------------------------------


def test_every_blank_line_document_matches_tiktoken(tmp_path, corpus, encoding):
    result = run_gpt("prepare", corpus, "--out", tmp_path / "out", "--separator", "blank-line",
                     "--val-fraction", "0.1", "--shard-tokens", "60000", "--workers", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    documents = paragraphs(corpus.read_text())
    tokens = [encoding.encode_ordinary(document) + [EOT] for document in documents]
    assert max(map(len, tokens)) > 2048  # some documents are drawn block by block, the others whole
    train, val, rule = expected_split(tokens, seed=1337, val_fraction=0.1)
    expected = {"train": train, "val": val}
    assert written(tmp_path / "out") == expected
    assert summary["documents"] == len(documents) > 1000
    assert summary["tokens"] == {split: len(ids) for split, ids in expected.items()}
    assert summary["bytes"] == sum(len(d.encode()) for d in documents)  # the documents' text, not blank lines
    assert summary["shards"]["train"] == -(-len(expected["train"]) // 60000)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["eot_id"] == EOT and manifest["documents"] == len(documents)
    assert 0.05 < summary["documents_by_split"]["val"] / len(documents) < 0.15


@pytest.mark.parametrize("separator", ["none", "line"])
@pytest.mark.parametrize("workers", [1, 2])
def test_documents_cut_into_small_tasks_still_match(tmp_path, corpus, encoding, separator, workers):
    """One whole-file document read in 4 KB pieces tokenizes exactly as the whole text does."""
    text = corpus.read_text()[:300_000]
    source = tmp_path / "play.txt"
    source.write_text(text)
    prepare(options([source], tmp_path / "out", f'separator="{separator}"', "val_fraction=0.0", f"workers={workers}",
                    chunk_chars=4096))
    if separator == "none":
        expected = encoding.encode_ordinary(text) + [EOT]
    else:
        expected = [i for line in text.split("\n") if line.strip() for i in encoding.encode_ordinary(line) + [EOT]]
    assert written(tmp_path / "out")["train"] == expected


@pytest.mark.slow
def test_worker_count_does_not_change_the_bytes(tmp_path, corpus):
    text = corpus.read_text()
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    (corpus / "a.txt").write_text(text[:200_000])
    (corpus / "nested" / "b.md").write_text(text[200_000:400_000])
    with gzip.open(corpus / "nested" / "c.txt.gz", "wt") as handle:
        handle.write(text[400_000:600_000])
    with open(corpus / "d.jsonl", "w") as handle:
        for paragraph in paragraphs(text[600_000:])[:2000]:
            handle.write(json.dumps({"text": paragraph, "id": 1}) + "\n")
    (corpus / "ignored.bin").write_bytes(b"\xff\x00" * 100)
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        result = run_gpt("prepare", corpus, "--out", out, "--workers", workers, "--shard-tokens", "40000",
                         "--val-fraction", "0.05", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs[workers] = shard_bytes(out)
        assert json.loads(result.stdout)["documents"] == 3 + 2000
    assert len(outputs["1"]) > 3
    assert outputs["1"] == outputs["2"]


# --- the train/val split: by block, deterministic, every token kept in order --------------------------------

MASK64 = (1 << 64) - 1


def drawn_for_val(key: int, seed: int, val_fraction: float) -> bool:
    """docs/data.md's rule, written out in plain Python: splitmix64 of the block's key."""
    z = (key + (seed + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return (z >> 11) / 2**53 < val_fraction


def expected_split(documents: list[list[int]], seed: int, val_fraction: float, block: int = 2048):
    """(train, val, rule): each document cut into blocks from its start; block k of document d drawn with the
    key d + k * 2**40; if the draw gives val nothing, the last `block` tokens when the corpus has two blocks."""
    streams = {"train": [], "val": []}
    for d, tokens in enumerate(documents):
        for k in range(0, len(tokens), block):
            val = drawn_for_val(d + (k // block << 40), seed, val_fraction)
            streams["val" if val else "train"].extend(tokens[k:k + block])
    if val_fraction == 0:
        return streams["train"], [], "none"
    if streams["val"]:
        return streams["train"], streams["val"], "draw"
    if len(streams["train"]) >= 2 * block:
        return streams["train"][:-block], streams["train"][-block:], "last block"
    return streams["train"], [], "too small"


@pytest.mark.parametrize("val_fraction, block", [(0.0, 16), (0.004, 16), (0.05, 16), (0.3, 64), (0.9, 4)])
def test_the_splitter_gives_the_rule_s_split_whatever_the_task_cuts(val_fraction, block):
    """Random documents, cut into tasks at random places (a document may run over several tasks): the
    splitter's streams, documents per split and rule equal the rule written out above."""
    from gptcli.data.split import Splitter

    rng = np.random.default_rng(int(val_fraction * 1000) + block)
    for trial in range(25):
        longest = int(rng.choice([max(block // 3, 2), 6 * block]))  # short documents: several in one block
        documents = [rng.integers(0, 50_000, int(rng.integers(1, longest))).tolist()
                     for _ in range(int(rng.integers(1, 40)))]
        train, val, rule = expected_split(documents, seed=trial, val_fraction=val_fraction, block=block)
        stream = [t for d in documents for t in d]
        ends = np.cumsum([len(d) for d in documents])
        cuts = sorted(set(rng.integers(1, len(stream), int(rng.integers(0, 6))).tolist())) if len(stream) > 1 else []
        splitter = Splitter(trial, val_fraction, block)
        got = {"train": [], "val": []}
        begun_in_val = []
        for low, high in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            inside = [e for e in ends if low < e <= high]  # documents ending in this task
            counts = np.diff([low, *inside, *([high] if high not in inside else [])])
            tokens = np.array(stream[low:high], dtype=np.uint16)
            to_train, to_val, begins = splitter.split(tokens, counts.astype(np.int64), high not in ends)
            got["train"] += to_train.tolist()
            got["val"] += to_val.tolist()
            begun_in_val += begins.tolist()
        held_train, held_val = splitter.finish()
        got["train"] += held_train.tolist()
        got["val"] += held_val.tolist()
        assert (got["train"], got["val"], splitter.rule) == (train, val, rule)
        starts = np.concatenate([[0], ends[:-1]])
        expected_val_docs = sum(drawn_for_val(d, trial, val_fraction) for d in range(len(documents)))
        if rule == "last block":  # documents beginning in the corpus's last block moved to val
            expected_val_docs = int(np.count_nonzero(starts >= len(stream) - block))
        assert len(begun_in_val) == len(documents)
        assert sum(begun_in_val) + splitter.moved_documents == expected_val_docs


@pytest.fixture
def one_book(tmp_path, corpus) -> Path:
    """One file of ~750,000 characters (some 170 blocks of 2,048 tokens), the size of a short book."""
    path = tmp_path / "book.txt"
    path.write_text(corpus.read_text()[:750_000])
    return path


def test_one_file_corpus_gets_val_blocks_spread_through_it(tmp_path, one_book, encoding):
    """A book as one document (the default separator): ~5% of its blocks go to val, from all over the text,
    and the result is the same with 1 or 2 workers and any task size."""
    corpus = encoding.encode_ordinary(one_book.read_text()) + [EOT]
    train, val, rule = expected_split([corpus], seed=1337, val_fraction=0.05)
    assert rule == "draw" and 0.02 < len(val) / len(corpus) < 0.1
    outputs = []
    for workers, chunk in ((1, 1 << 20), (2, 50_000)):
        out = tmp_path / f"out{workers}"
        summary = prepare(options([one_book], out, "val_fraction=0.05", f"workers={workers}", chunk_chars=chunk))
        assert written(out) == {"train": train, "val": val}
        assert summary.split["rule"] == "draw" and summary.split["blocks"] == -(-len(corpus) // 2048)
        outputs.append(shard_bytes(out))
    assert outputs[0] == outputs[1]
    first_val_block = next(k for k in range(0, len(corpus), 2048) if corpus[k:k + 2048] == val[:2048])
    assert first_val_block < len(corpus) // 2  # not only the last pages


@pytest.mark.slow
def test_when_the_draw_picks_no_block_the_last_one_is_held_out(tmp_path, one_book, encoding):
    corpus = encoding.encode_ordinary(one_book.read_text()) + [EOT]
    blocks = -(-len(corpus) // 2048)
    train, val, rule = expected_split([corpus], seed=1337, val_fraction=0.005)
    assert rule == "last block" and blocks > 100  # with this seed the first block drawn is number 363
    result = run_gpt("prepare", one_book, "--out", tmp_path / "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert written(tmp_path / "out") == {"train": corpus[:-2048], "val": corpus[-2048:]}
    report = json.loads(result.stdout)
    assert report["split"] == {"by": "block", "block_tokens": 2048, "rule": "last block", "blocks": blocks,
                               "val_blocks": 1}
    assert report["documents_by_split"] == {"train": 1, "val": 0}
    human = run_gpt("prepare", one_book, "--out", tmp_path / "out2", cwd=tmp_path)
    assert "rule: last block held out" in " ".join(human.stdout.split())


def test_a_file_smaller_than_two_blocks_keeps_everything_in_train(tmp_path, encoding):
    text = "A short note, far smaller than one block of the split."
    (tmp_path / "note.txt").write_text(text)
    result = run_gpt("prepare", tmp_path / "note.txt", "--out", tmp_path / "out", "--val-fraction", "0.01", "--json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert written(tmp_path / "out") == {"train": encoding.encode_ordinary(text) + [EOT], "val": []}
    assert json.loads(result.stdout)["split"]["rule"] == "too small"
    assert "No val split" in result.stderr and "val_block_tokens" in " ".join(result.stderr.split())


def test_short_records_are_drawn_whole_as_before(tmp_path, corpus, encoding):
    """A jsonl of many short records: every record is shorter than a block, so each is drawn as one unit
    with the key it always had (its index): the split is the one earlier versions made."""
    lines = [line for line in corpus.read_text().split("\n") if line.strip()][:6000]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    result = run_gpt("prepare", tmp_path / "records.jsonl", "--out", tmp_path / "out", "--val-fraction", "0.1",
                     "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    by_document = split_streams(lines, encoding, seed=1337, val_fraction=0.1)
    assert written(tmp_path / "out") == by_document
    train, val, rule = expected_split([encoding.encode_ordinary(line) + [EOT] for line in lines], 1337, 0.1)
    assert (train, val, rule) == (by_document["train"], by_document["val"], "draw")
    assert 500 < json.loads(result.stdout)["documents_by_split"]["val"] < 700


def test_val_fraction_zero_puts_every_token_in_train(tmp_path, one_book, encoding):
    summary = prepare(options([one_book], tmp_path / "out", "val_fraction=0", "workers=1"))
    assert written(tmp_path / "out") == {"train": encoding.encode_ordinary(one_book.read_text()) + [EOT], "val": []}
    assert summary.split["rule"] == "none" and summary.shards["val"] == 0 and not summary.warnings


# --- every kind of input -------------------------------------------------------------------------------------


def test_glob_gz_and_jsonl_gz(tmp_path, encoding):
    (tmp_path / "x1.txt").write_text("first document")
    (tmp_path / "x2.txt").write_text("second document")
    with gzip.open(tmp_path / "y.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"body": "third"}) + "\n\n" + json.dumps({"body": "fourth"}) + "\n")
    result = run_gpt("prepare", str(tmp_path / "x*.txt"), tmp_path / "y.jsonl.gz", "--text-column", "body",
                     "--out", tmp_path / "out", "--val-fraction", "0", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    documents = ["first document", "second document", "third", "fourth"]
    assert written(tmp_path / "out")["train"] == [i for d in documents for i in encoding.encode_ordinary(d) + [EOT]]


@pytest.mark.slow
def test_saved_dataset_dir(tmp_path, encoding):
    import datasets

    rows = ["row one", "", "row three has more words", None]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": rows, "n": [1, 2, 3, 4]}),
        "test": datasets.Dataset.from_dict({"content": ["held out"], "n": [0]}),
    }).save_to_disk(str(tmp_path / "saved"))
    result = run_gpt("prepare", tmp_path / "saved", "--text-column", "content", "--out", tmp_path / "out",
                     "--val-fraction", "0", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = [i for d in ("row one", "row three has more words") for i in encoding.encode_ordinary(d) + [EOT]]
    assert written(tmp_path / "out")["train"] == expected
    assert json.loads(result.stdout)["documents"] == 2
    missing = run_gpt("prepare", tmp_path / "saved", "--out", tmp_path / "out2", cwd=tmp_path)
    assert_user_error(missing, "no column 'text'", "content", "--text-column")


def test_hub_dataset_offline_is_one_clear_sentence(tmp_path):
    """The sentence comes from the one quick check before datasets is asked (test_sources.py shows it is
    one connection attempt); datasets' own failure, after its retries, would read "Could not open"."""
    # A closed local port stands in for "no network", so this holds on a machine that has one too.
    result = run_gpt("prepare", "hf:wikitext/wikitext-103-raw-v1", "--out", tmp_path / "out", cwd=tmp_path,
                     env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_user_error(result, "hf:wikitext/wikitext-103-raw-v1 needs the Hugging Face Hub", "save_to_disk")
    assert_nothing_written(tmp_path)


def test_project_file_and_default_out(tmp_path):
    (tmp_path / "run.toml").write_text('[data]\ndir = "prepared"\nseparator = "line"\nval_fraction = 0.0\n')
    (tmp_path / "lines.txt").write_text("one\ntwo\n\nthree\n")
    result = run_gpt("prepare", "lines.txt", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["documents"] == 3
    assert (tmp_path / "prepared" / "manifest.json").is_file()


def test_invalid_utf8_replaced_on_request(tmp_path, encoding):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd")  # 3 bad bytes + a real U+FFFD
    result = run_gpt("prepare", tmp_path / "bad.txt", "--out", tmp_path / "out", "--replace-invalid-utf8",
                     "--val-fraction", "0", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["replaced_bytes"] == 3
    assert "3 invalid UTF-8 bytes" in result.stderr
    text = "caf\ufffd ok \ufffd\ufffd end \ufffd"
    assert written(tmp_path / "out")["train"] == encoding.encode_ordinary(text) + [EOT]


# --- honest counts ------------------------------------------------------------------------------------------

TEXTS = ["Caf\u00e9 \"au lait\", na\u00efve r\u00e9sum\u00e9 \u2014 \u6f22\u5b57.", "A second document\twith a tab.",
         "\u00bfTercero? \U0001f600 s\u00ed."]


def write_input(kind: str, directory):
    """TEXTS as an input of `kind`; returns the path to name."""
    if kind == "text":
        path = directory / "corpus.txt"
        path.write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    elif kind == "jsonl":  # JSON escapes (\u00e9, \") make the file longer than the text
        path = directory / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": t, "meta": "not text"}) + "\n" for t in TEXTS))
    else:
        import datasets
        path = directory / "saved"
        datasets.Dataset.from_dict({"text": TEXTS, "id": [1, 2, 3]}).save_to_disk(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "jsonl", "dataset"])
def test_bytes_are_the_utf8_bytes_of_the_documents_text(tmp_path, encoding, kind):
    path = write_input(kind, tmp_path)
    result = run_gpt("prepare", path, "--out", tmp_path / "out", "--separator", "blank-line", "--val-fraction", "0",
                     "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    text_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert report["bytes"] == text_bytes  # not the file's bytes, not counted twice
    tokens = sum(len(encoding.encode_ordinary(t)) + 1 for t in TEXTS)
    assert report["tokens"]["train"] == tokens and report["tokens_per_byte"] == round(tokens / text_bytes, 6)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["bytes"] == text_bytes


@pytest.mark.slow
def test_several_inputs_are_counted_one_by_one(tmp_path, encoding):
    paths = [write_input(kind, tmp_path) for kind in ("text", "jsonl")]
    (tmp_path / "one.txt").write_text("just one line")
    result = run_gpt("prepare", *paths, tmp_path / "one.txt", "--out", tmp_path / "out", "--separator", "blank-line",
                     "--val-fraction", "0", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tokens = sum(len(encoding.encode_ordinary(t)) + 1 for t in TEXTS)
    text_bytes = sum(len(t.encode()) for t in TEXTS)
    assert json.loads(result.stdout)["inputs"] == [
        {"input": str(paths[0]), "documents": 3, "tokens": tokens, "bytes": text_bytes},
        {"input": str(paths[1]), "documents": 3, "tokens": tokens, "bytes": text_bytes},
        {"input": str(tmp_path / "one.txt"), "documents": 1, "tokens": 4, "bytes": 13}]
    human = run_gpt("prepare", *paths, tmp_path / "one.txt", "--out", tmp_path / "out2", "--separator", "blank-line",
                    cwd=tmp_path, env={"COLUMNS": "300"})
    assert human.returncode == 0, human.stderr
    row = next(line for line in human.stdout.splitlines() if "one.txt" in line)
    assert [cell.strip() for cell in row.split("│")[2:5]] == ["1", "4", "13"]


# --- progress -------------------------------------------------------------------------------------------------


def test_progress_counts_bytes_of_a_known_size_input_up_to_the_total(tmp_path, one_book):
    """Known-size input: bytes done and tokens only rise, to the file's size; the elapsed time only rises.
    (No wall-clock assertion here: the ETA's arithmetic is checked with given times below.)"""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(one_book.read_text())
    seen = []
    prepare(options([corpus], tmp_path / "out", 'separator="line"', "workers=1", chunk_chars=50_000), seen.append)
    assert len(seen) > 10
    assert seen[-1].done_bytes == seen[-1].total_bytes == corpus.stat().st_size
    assert all(a.done_bytes <= b.done_bytes and a.tokens <= b.tokens and a.seconds <= b.seconds
               for a, b in zip(seen, seen[1:], strict=False))
    assert all(p.eta_seconds is not None for p in seen if p.seconds > 0)


def test_the_eta_is_the_time_left_at_the_average_rate_so_far():
    from gptcli.data.prepare import Progress

    tenth = Progress(done_bytes=100, total_bytes=1000, documents=5, tokens=300, seconds=2.0)
    assert tenth.eta_seconds == pytest.approx(18.0)  # 900 bytes left at 50 bytes/s
    assert tenth.tokens_per_second == pytest.approx(150.0)
    assert Progress(1000, 1000, 5, 300, 20.0).eta_seconds == 0.0
    assert Progress(0, 1000, 0, 0, 0.5).eta_seconds is None  # nothing done yet: no rate
    assert Progress(100, 0, 5, 300, 2.0).eta_seconds is None  # a stream of unknown size


def test_progress_of_an_unsized_input_counts_documents_and_tokens(tmp_path):
    path = write_input("dataset", tmp_path)
    seen = []
    prepare(options([path], tmp_path / "out", "workers=1"), seen.append)
    assert seen and seen[-1].total_bytes == 0 and seen[-1].eta_seconds is None
    assert seen[-1].documents == 3 and seen[-1].tokens > 3


# --- bad input: one sentence, non-zero exit, nothing half-written ------------------------------------------


def bad(tmp_path, *args):
    return run_gpt("prepare", *args, "--out", tmp_path / "out", cwd=tmp_path)


@pytest.mark.slow
def test_missing_path(tmp_path):
    assert_user_error(bad(tmp_path, tmp_path / "nope.txt"), "nope.txt does not exist")
    assert_user_error(bad(tmp_path, str(tmp_path / "nope*.txt")), "matches no files")
    assert_nothing_written(tmp_path)


def test_directory_without_text(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")
    assert_user_error(bad(tmp_path, tmp_path / "d"), "holds no text files")
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    assert_user_error(bad(tmp_path, tmp_path / "empty.txt"), "holds no text")
    assert_user_error(bad(tmp_path, tmp_path / "blank.txt", "--separator", "blank-line"), "holds no text")
    assert_nothing_written(tmp_path)


def test_non_utf8_is_refused_by_default(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    assert_user_error(bad(tmp_path, tmp_path / "latin1.txt"), "latin1.txt is not valid UTF-8", "0xef",
                      "--replace-invalid-utf8")
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_jsonl_broken_line_and_missing_field(tmp_path):
    good = json.dumps({"text": "fine"})
    (tmp_path / "broken.jsonl").write_text(f"{good}\n{good}\n{{\"text\": \"unterminated\n{good}\n")
    assert_user_error(bad(tmp_path, tmp_path / "broken.jsonl"), "broken.jsonl line 3 is not valid JSON")
    (tmp_path / "field.jsonl").write_text(f"{good}\n\n" + json.dumps({"body": "x"}) + "\n")
    assert_user_error(bad(tmp_path, tmp_path / "field.jsonl"), "field.jsonl line 3 has no 'text' field")
    (tmp_path / "number.jsonl").write_text(json.dumps({"text": 7}) + "\n")
    assert_user_error(bad(tmp_path, tmp_path / "number.jsonl"), "number.jsonl line 1", "int, not text")
    assert_nothing_written(tmp_path)


def test_unwritable_output(tmp_path, corpus):
    (tmp_path / "afile").write_text("x")
    result = run_gpt("prepare", corpus, "--out", tmp_path / "afile" / "out", cwd=tmp_path)
    assert_user_error(result, "Cannot write the output dir")
    result = run_gpt("prepare", corpus, "--out", tmp_path / "afile", cwd=tmp_path)
    assert_user_error(result, "is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.slow
def test_non_empty_output_and_force(tmp_path, one_book):
    small = tmp_path / "small.txt"
    small.write_text(one_book.read_text()[:20_000])
    out = tmp_path / "out"
    first = run_gpt("prepare", one_book, "--out", out, "--shard-tokens", "50000", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    old_shards = sorted(p.name for p in out.glob("*.bin"))
    refused = run_gpt("prepare", small, "--out", out, cwd=tmp_path)
    assert_user_error(refused, "is not empty", "--force")
    assert sorted(p.name for p in out.glob("*.bin")) == old_shards
    forced = run_gpt("prepare", small, "--out", out, "--shard-tokens", "50000", "--val-fraction", "0",
                     "--force", "--json", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in out.iterdir()) == [".gptcli-files", "manifest.json", "train_000000.bin"]  # no old shard left
    open_prepared(out, verify=True)
    assert not list(tmp_path.glob(".out.*"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    not_data = run_gpt("prepare", small, "--out", tmp_path / "home", "--force", cwd=tmp_path)
    assert_user_error(not_data, "holds no record of files written by gptcli")
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["notes.txt", "subdir/notes.txt"])
def test_force_never_deletes_what_prepare_did_not_write(tmp_path, extra):
    """A user's notes or a subdirectory in a prepared dir: --force refuses and deletes nothing."""
    (tmp_path / "a.txt").write_text("some text to prepare")
    out = tmp_path / "out"
    assert run_gpt("prepare", tmp_path / "a.txt", "--out", out, cwd=tmp_path).returncode == 0
    (out / extra).parent.mkdir(exist_ok=True)
    (out / extra).write_text("precious")
    before = snapshot(out)
    refused = run_gpt("prepare", tmp_path / "a.txt", "--out", out, "--force", cwd=tmp_path)
    assert_user_error(refused, "holds files gptcli did not write", extra.split("/")[0])
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".out.*"))


def test_force_never_deletes_an_input(tmp_path):
    """`gpt prepare books/corpus.txt --out books --force` once deleted corpus.txt."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "corpus.txt").write_text("the only copy of a corpus")
    result = run_gpt("prepare", "books/corpus.txt", "--out", "books", "--force", cwd=tmp_path)
    assert_user_error(result, "corpus.txt, an input of this command")
    assert (books / "corpus.txt").read_text() == "the only copy of a corpus"
    assert [p.name for p in books.iterdir()] == ["corpus.txt"]


@pytest.mark.slow
def test_force_replaces_data_prepared_before_the_owned_files_list(tmp_path):
    """A dir from an older gptcli has a manifest but no .gptcli-files: the manifest says what is ours."""
    (tmp_path / "a.txt").write_text("some text to prepare")
    out = tmp_path / "out"
    assert run_gpt("prepare", tmp_path / "a.txt", "--out", out, cwd=tmp_path).returncode == 0
    (out / ".gptcli-files").unlink()
    forced = run_gpt("prepare", tmp_path / "a.txt", "--out", out, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    (out / ".gptcli-files").unlink()
    (out / "README").write_text("mine")
    refused = run_gpt("prepare", tmp_path / "a.txt", "--out", out, "--force", cwd=tmp_path)
    assert_user_error(refused, "holds files gptcli did not write", "README")
    assert (out / "README").read_text() == "mine" and (out / "manifest.json").is_file()


# --- verification ----------------------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path, one_book):
    result = run_gpt("prepare", one_book, "--out", tmp_path / "out", "--shard-tokens", "100000",
                     "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "out"


def test_verify_passes_and_reports(prepared):
    result = run_gpt("prepare", "--verify", prepared, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["shards"] == len(list(prepared.glob("*.bin")))
    assert report["tokens"] == json.loads((prepared / "manifest.json").read_text())["tokens"]


def test_verify_truncated_shard(prepared):
    shard = prepared / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_user_error(run_gpt("prepare", "--verify", prepared), "train_000001.bin is truncated or corrupt")


@pytest.mark.slow
def test_verify_bad_magic(prepared):
    shard = prepared / "train_000000.bin"
    shard.write_bytes(b"XXXXXXXX" + shard.read_bytes()[8:])
    assert_user_error(run_gpt("prepare", "--verify", prepared), "train_000000.bin is not a gptcli shard",
                      "bad magic")


def test_verify_checksum_mismatch(prepared):
    shard = prepared / "train_000002.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 2 * 777] ^= 0x01  # one token id changed, still inside the vocabulary
    shard.write_bytes(bytes(raw))
    assert_user_error(run_gpt("prepare", "--verify", prepared), "train_000002.bin does not match the checksum")


def test_verify_without_manifest(tmp_path):
    (tmp_path / "half").mkdir()
    assert_user_error(run_gpt("prepare", "--verify", tmp_path / "half"), "has no manifest.json")


# --- interruption ----------------------------------------------------------------------------------------------


@pytest.fixture
def big_corpus(tmp_path, corpus):
    path = tmp_path / "big.txt"
    text = corpus.read_text()
    with open(path, "w") as handle:
        for _ in range(30):  # ~36 MB: several seconds of work with one worker
            handle.write(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_prepare_never_looks_complete(tmp_path, big_corpus, how):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "gptcli", "prepare", str(big_corpus), "--out", str(out),
                                "--workers", "1", "--shard-tokens", "200000", "--separator", "line"],
                               cwd=tmp_path, env=gpt_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: list(tmp_path.glob(".out.prepare-*/train_000001.bin")), process,
               "a second shard")  # mid-run: shards are being written
    process.send_signal(how)
    _, stderr = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}[how]
    assert not (out / "manifest.json").exists()
    with pytest.raises(GptError):
        open_prepared(out)
    if how != signal.SIGKILL:  # cleaned up on the way out, saying where it stopped
        assert not list(tmp_path.glob(".out.*")), stderr
        assert b"Traceback" not in stderr
        message = " ".join(stderr.decode().split())
        assert f"stopped by {how.name}: gpt prepare stopped" in message
        assert f"while reading {big_corpus} (input 1 of 1) after tokenizing" in message
        assert f"nothing was published: {out} not created" in message
    else:  # a killed run's leftovers are swept by the next run into the same dir
        small = tmp_path / "small.txt"
        small.write_text("a small corpus")
        result = run_gpt("prepare", small, "--out", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
def test_workers_die_with_a_killed_main_process(tmp_path, big_corpus):
    """kill -9 of `gpt prepare` once left its tokenizer workers running for ever, holding the caller's pipes."""
    import psutil

    process = subprocess.Popen([sys.executable, "-m", "gptcli", "prepare", str(big_corpus), "--out",
                                str(tmp_path / "out"), "--workers", "2", "--separator", "line"],
                               cwd=tmp_path, env=gpt_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    main = psutil.Process(process.pid)
    wait_until(lambda: len(main.children()) >= 2 and list(tmp_path.glob(".out.prepare-*/.train_000000.bin.tmp")),
               process, "two workers writing a shard")
    workers = main.children()
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=HANG_SECONDS)
    assert not alive, [p.pid for p in alive]
    process.stdout.read(), process.stderr.read()  # the pipes close: no worker holds them


@pytest.mark.slow
def test_help_and_bracketed_messages_render():
    """Rich markup must not eat "[data]" in help or crash on "[/...]" in an error message."""
    result = run_gpt("prepare", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "hf:NAME[/CONFIG]" in result.stdout and "[data] shard_tokens" in result.stdout
    missing = run_gpt("prepare", "notes[/x].txt")
    assert_user_error(missing, "notes[/x].txt matches no files")
    assert_user_error(run_gpt("prepare"), "No input given")


def test_the_next_command_trains_on_what_was_just_prepared(tmp_path, monkeypatch):
    from gptcli.config import project_from_dict
    from gptcli.data.prepare import next_command

    monkeypatch.chdir(tmp_path)
    defaults = project_from_dict({})
    assert next_command(Path("data/shards"), defaults).endswith("then gpt train")
    assert next_command(Path("elsewhere"), defaults).endswith("""then gpt train --set 'data.dir="elsewhere"'""")
    assert next_command(Path("data/shards"), project_from_dict({}, source="run.toml")) == "gpt train"
    named = project_from_dict({"data": {"dir": "books"}}, source="books.toml")
    assert next_command(Path("books"), named) == "gpt train --project books.toml"


# --- outputs and sizes at the edges -----------------------------------------------------------------


def test_force_never_replaces_a_symlinked_out_dir(tmp_path):
    """`prepare --force --out LINK` replaced the link with a dir and left `.LINK.old-PID` behind."""
    (tmp_path / "a.txt").write_text("some text to prepare")
    prepare(options([tmp_path / "a.txt"], tmp_path / "real", "workers=1"))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(GptError, match="link is a symbolic link; gptcli never replaces a link"):
        prepare(options([tmp_path / "a.txt"], tmp_path / "link", "workers=1", force=True))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and (tmp_path / "link").is_symlink()


def test_a_model_dir_is_never_replaced_by_prepared_data(tmp_path):
    (tmp_path / "a.txt").write_text("some text to prepare")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    (model / ".gptcli-files").write_text(json.dumps({"what": "model dir", "files": ["model.safetensors"]}))
    with pytest.raises(GptError, match="holds model dir written by gptcli; --force replaces only what it wrote as prepared data"):
        prepare(options([tmp_path / "a.txt"], model, "workers=1", force=True))
    assert (model / "model.safetensors").read_bytes() == b"w"


def test_workers_far_above_the_cores_are_cut_to_them_with_a_warning(tmp_path):
    """`--workers 100000` started processes until the machine stalled for minutes."""
    from gptcli.data.prepare import usable_cores

    (tmp_path / "a.txt").write_text("one line of text\n" * 50)
    summary = prepare(options([tmp_path / "a.txt"], tmp_path / "out", "workers=100000"))
    assert summary.workers == usable_cores()
    assert any("--workers 100,000 is more than the" in warning for warning in summary.warnings)


def test_a_second_prepare_into_the_same_out_dir_is_refused_while_the_first_writes(tmp_path):
    """Two `gpt prepare --out new` at once both said `next:`; one result was gone."""
    hold = ("import sys, time\nfrom gptcli.fsutil import output_lock\n"
            "with output_lock(sys.argv[1], 'gpt prepare'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    first = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "out")], env=gpt_env(), stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        (tmp_path / "a.txt").write_text("some text to prepare")
        second = run_gpt("prepare", tmp_path / "a.txt", "--out", tmp_path / "out", "--workers", "1", cwd=tmp_path)
        assert_user_error(second, "is in use by another gpt prepare", f"pid {first.pid}")
        assert "next:" not in second.stdout and not (tmp_path / "out").exists()
    finally:
        first.kill()
        first.wait()
