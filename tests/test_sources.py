"""Inputs of `gpt prepare` and `gpt eval --dataset`: naming, the one way datasets are opened, typed tasks."""

from __future__ import annotations

import json
import time

import pytest

from gptcli.data.sources import (DatasetRows, FilePiece, JsonlRecords, ReadSettings, ReadState, TextLines,
                                 TextParagraphs, hub_name, open_dataset, read_tasks, resolve_inputs)
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
    """Both spellings go through one opener, and both fail in a second without a network."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no network, even on a machine with one
    started = time.monotonic()
    with pytest.raises(GptError, match=f"{spec} needs the Hugging Face Hub, which cannot be reached"):
        open_dataset(spec, "test")
    assert time.monotonic() - started < 10


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
    sources = resolve_inputs([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])

    def tasks(separator):
        return list(read_tasks(sources, ReadSettings(separator=separator), ReadState()))

    none, line, paragraph = tasks("none"), tasks("line"), tasks("blank-line")
    assert [type(t) for t in none] == [FilePiece, JsonlRecords]
    assert none[0].documents() == (["one\n\ntwo\nlines\n"], True)
    assert line[0] == TextLines(0, "one\n\ntwo\nlines\n") and line[0].documents() == (["one", "two", "lines"], True)
    assert type(paragraph[0]) is TextParagraphs and paragraph[0].documents() == (["one", "two\nlines"], True)
    assert none[1].source == 1 and none[1].documents() == (["x", "y"], True)
    assert DatasetRows(0, ["r", "", "s"]).documents() == (["r", "s"], True)


@pytest.mark.parametrize("line", [
    '{"text": "a"}', '  {"text": "a"}  \r', '{"text": "a"} x', '{"text": "a"}, {"text": "b"}', '[1', '"x"',
    '1 2', '\ufeff{"a": 1}', '{"a": NaN}', '{"a": 1e400}', 'nul', 'null', '{"a": "\\ud800"}', '\u00a0{"a": 1}',
    '{"text": "é\\n"}\t', '{"a": {"b": [1, 2, {"c": null}]}}', '{"a": 1}}'])
def test_a_jsonl_line_is_read_exactly_as_json_loads_reads_it(line):
    from gptcli.data.sources import _one_json_value

    try:
        expected = ("value", repr(json.loads(line)))
    except ValueError:
        expected = ("error",)
    try:
        got = ("value", repr(_one_json_value(line)))
    except ValueError:
        got = ("error",)
    assert got == expected
