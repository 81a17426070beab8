"""Inputs of `gpt prepare` and `gpt eval --dataset`: naming, the one way datasets are opened, typed tasks."""

from __future__ import annotations

import gzip
import json

import pytest

from gptcli.data.sources import (
    DatasetRows,
    FilePiece,
    FileRange,
    JsonlRecords,
    ReadSettings,
    ReadState,
    TextLines,
    TextParagraphs,
    hub_name,
    open_dataset,
    read_tasks,
    resolve_inputs,
)
from gptcli.errors import GptError


@pytest.mark.parametrize("spec, expected", [
    ("hf:wikitext/wikitext-103-raw-v1", ("wikitext", "wikitext-103-raw-v1")),
    ("hf:openwebtext", ("openwebtext", None)),
    ("hf:Salesforce/wikitext/wikitext-2-raw-v1", ("Salesforce/wikitext", "wikitext-2-raw-v1")),
    ("wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1")),  # what `gpt eval --dataset` took
    ("Salesforce/wikitext:wikitext-2-raw-v1", ("Salesforce/wikitext", "wikitext-2-raw-v1")),
    ("wikitext", ("wikitext", None)),
])
def test_hub_names(spec, expected):
    assert hub_name(spec) == expected


@pytest.fixture
def saved(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
        "test": datasets.Dataset.from_dict({"text": ["held out"]}),
    }).save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_dict({"text": ["only"]}).save_to_disk(str(tmp_path / "single"))
    return tmp_path


def test_saved_dirs_give_the_split_asked_for(saved):
    assert open_dataset(str(saved / "dict"))["text"] == ["a", "b"]  # prepare: train
    assert open_dataset(str(saved / "dict"), "test")["text"] == ["held out"]  # eval: its split
    assert open_dataset(str(saved / "single"), "test")["text"] == ["only"]
    with pytest.raises(GptError, match="holds the splits train, test and none is named validation"):
        open_dataset(str(saved / "dict"), "validation")


@pytest.mark.parametrize("spec", ["hf:wikitext/wikitext-2-raw-v1", "wikitext:wikitext-2-raw-v1"])
def test_hub_datasets_fail_at_once_without_the_hub(spec, monkeypatch):
    """Both spellings go through one opener, and both fail after one short connection attempt to the Hub's
    endpoint, before datasets (which retries for minutes) is asked for anything."""
    import socket

    import datasets

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no network, even on a machine with one
    attempts = []
    connect = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None, *args, **kwargs: (
        attempts.append((address, timeout)), connect(address, timeout, *args, **kwargs))[1])
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("datasets was asked"))
    with pytest.raises(GptError, match=f"{spec} needs the Hugging Face Hub, which cannot be reached"):
        open_dataset(spec, "test")
    assert [address for address, _ in attempts] == [("127.0.0.1", 9)]
    assert 0 < attempts[0][1] <= 5  # a connection that cannot hang: a few seconds at most


def test_eval_datasets_use_the_same_opener(saved, monkeypatch):
    from gptcli.evaluate import dataset_tokens
    from gptcli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    assert dataset_tokens(str(saved / "dict"), "test", "text", tokenizer).tolist() == tokenizer.encode("held out")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GptError, match="switched off by HF_HUB_OFFLINE"):
        dataset_tokens("wikitext:wikitext-2-raw-v1", "test", "text", tokenizer)


def test_tasks_are_typed_by_how_their_text_becomes_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nlines\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    with gzip.open(tmp_path / "c.txt.gz", "wt") as handle:
        handle.write("one\n\ntwo\nlines\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write('{"text": "x"}\n\n{"text": "y"}\n')
    sources = resolve_inputs([str(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.txt.gz", "d.jsonl.gz")])

    def tasks(separator):
        return list(read_tasks(sources, ReadSettings(separator=separator), ReadState()))

    none, line, paragraph = tasks("none"), tasks("line"), tasks("blank-line")
    # Plain files cut at line ends are read by the worker itself (FileRange); compressed ones by the reader.
    assert [type(t) for t in none] == [FilePiece, FileRange, FilePiece, JsonlRecords]
    assert [type(t) for t in line] == [FileRange, FileRange, TextLines, JsonlRecords]
    assert none[0].documents() == (["one\n\ntwo\nlines\n"], True)
    assert line[0] == FileRange(0, str(tmp_path / "a.txt"), 0, 15, "line")
    assert line[0].documents() == (["one", "two", "lines"], True) == line[2].documents()
    assert line[2] == TextLines(2, "one\n\ntwo\nlines\n")
    assert type(paragraph[0]) is TextParagraphs and paragraph[0].documents() == (["one", "two\nlines"], True)
    assert none[1].source == 1 and none[1].documents() == (["x", "y"], True) == none[3].documents()
    assert DatasetRows(0, ["r", "", "s"]).documents() == (["r", "s"], True)


def test_file_ranges_cover_the_file_and_end_at_line_ends(tmp_path):
    """Each range ends just after a line end (or at the end of the file), the next starts there, and a line
    longer than the task size is kept whole."""
    lines = [f"line {i} " + "é" * (i % 7) for i in range(3000)]
    lines[1234] = "x" * 20_000  # longer than a task
    path = tmp_path / "lines.txt"
    data = ("\n".join(lines) + "\nno final line end").encode()
    path.write_bytes(data)
    state = ReadState()
    ranges = list(read_tasks(resolve_inputs([str(path)]), ReadSettings(separator="line", chunk_chars=4096), state))
    assert len(ranges) > 10 and all(type(r) is FileRange for r in ranges)
    assert ranges[0].start == 0 and ranges[-1].end == len(data) == state.disk_bytes
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(data[r.end - 1:r.end] == b"\n" for r in ranges[:-1])
    assert [d for r in ranges for d in r.documents()[0]] == lines + ["no final line end"]


def test_a_file_range_names_the_file_line_and_offset_of_a_bad_record(tmp_path):
    good = json.dumps({"text": "fine"})
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join([good] * 999 + ['{"text": broken'] + [good] * 100) + "\n")
    ranges = list(read_tasks(resolve_inputs([str(path)]), ReadSettings(chunk_chars=1000), ReadState()))
    assert len(ranges) > 10
    with pytest.raises(GptError, match=r"big\.jsonl line 1000 is not valid JSON"):
        for task in ranges:
            task.documents()
    path.write_bytes(good.encode() + b"\n" * 3000 + b'{"text": "caf\xe9"}\n')
    offset = len(good) + 3000 + len('{"text": "caf')  # of the 0xe9, counted from 0: 3,029
    with pytest.raises(GptError, match=rf"not valid UTF-8 \(byte 0xe9 near offset {offset:,}\)"):
        for task in read_tasks(resolve_inputs([str(path)]), ReadSettings(chunk_chars=1000), ReadState()):
            task.documents()
    replacing = ReadSettings(chunk_chars=1000, replace_invalid_utf8=True)
    tasks = list(read_tasks(resolve_inputs([str(path)]), replacing, ReadState()))
    assert [task.read() for task in tasks][-1] == (["caf\ufffd"], 1)


@pytest.mark.parametrize("line", [
    '{"text": "a"}', '  {"text": "a"}  \r', '{"text": "a"} x', '{"text": "a"}, {"text": "b"}', '[1', '"x"',
    '1 2', '\ufeff{"a": 1}', '{"a": NaN}', '{"a": 1e400}', 'nul', 'null', '{"a": "\\ud800"}', '\u00a0{"a": 1}',
    '{"text": "é\\n"}\t', '{"a": {"b": [1, 2, {"c": null}]}}', '{"a": 1}}'])
def test_a_jsonl_line_is_read_exactly_as_json_loads_reads_it(line):
    from gptcli.parsing import one_json_value

    try:
        expected = ("value", repr(json.loads(line)))
    except ValueError:
        expected = ("error",)
    try:
        got = ("value", repr(one_json_value(line)))
    except ValueError:
        got = ("error",)
    assert got == expected


def test_a_lone_surrogate_in_a_jsonl_record_is_one_sentence_or_replaced(tmp_path):
    """`{"text": "\\ud800"}` is valid JSON but no text: tiktoken raised UnicodeEncodeError (internal error)."""
    from gptcli.data.sources import jsonl_records
    from gptcli.errors import GptError

    text = '{"text": "ok"}\n{"text": "a \\ud800 b"}\n{"text": "\\ud83d\\ude00 pair"}\n'
    with pytest.raises(Exception) as refused:
        jsonl_records(text, "text")
    assert "holds a lone UTF-16 surrogate (\\ud800)" in str(refused.value.args[1])
    assert "--replace-invalid-utf8" in refused.value.args[1]
    assert jsonl_records(text, "text", replace_invalid=True) == ["ok", "a \ufffd b", "\U0001F600 pair"]
    path = tmp_path / "records.jsonl"
    path.write_text(text)
    from gptcli.data.prepare import PrepareOptions, prepare

    with pytest.raises(GptError, match="records.jsonl line 2: field 'text' holds a lone UTF-16 surrogate"):
        prepare(PrepareOptions(inputs=[str(path)], out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
