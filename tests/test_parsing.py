"""Parsing within bounds (parsing.py): a number of thousands of digits, a value nested thousands deep, a digit
`int()` refuses, a size that is infinite or zero, a damaged .gz: each is one sentence naming what was read,
never "internal error" (a ValueError of Python's digit limit, a RecursionError, an OverflowError)."""

from __future__ import annotations

import gzip
import os

import pytest

from gptcli.errors import GptError
from in_process import gpt

DIGITS = "9" * 5000  # past CPython's 4,300-digit limit on int() from text
DEEP_TOML = "[" * 3000 + "]" * 3000
DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("argv, fragment", [
    (["--set", f"project.seed={DIGITS}"], "--set project.seed: the value is not read: it holds an integer of more "
                                           "than 4,300 digits"),
    (["--set", f"train.lr={DEEP_TOML}"], "--set train.lr: the value is not read: it nests values deeper"),
    (["gpt2", "--micro-batch", DIGITS], '--micro-batch must be a whole number of sequences or "auto", not'),
    (["gpt2", "--micro-batch", "²"], '--micro-batch must be a whole number of sequences or "auto", not \'²\''),
    (["gpt2", "--gpu-memory", "1e400"], 'from 1MiB to 1PiB, not "1e400"'),
    (["gpt2", "--gpu-memory", "0.0000001"], 'from 1MiB to 1PiB, not "0.0000001"'),
], ids=["set-digits", "set-nesting", "micro-batch-digits", "micro-batch-superscript", "gpu-memory-infinite",
        "gpu-memory-zero-bytes"])
def test_command_line_values_past_the_bounds_are_one_sentence(monkeypatch, capsys, argv, fragment):
    code, said = gpt(monkeypatch, capsys, "inspect-params", *argv)
    assert code == 1 and said.startswith("error: ") and fragment in said, said
    assert len(said) < 400, "the value itself is not echoed whole"


@pytest.mark.parametrize("content, fragment", [
    (f"[project]\nseed = {DIGITS}\n", "is not read: it holds an integer of more than 4,300 digits"),
    (f"[project]\nname = {DEEP_TOML}\n", "is not read: it nests values deeper than Python can read"),
], ids=["digits", "nesting"])
def test_a_project_file_past_the_bounds_is_one_sentence(tmp_path, monkeypatch, capsys, content, fragment):
    project = tmp_path / "run.toml"
    project.write_text(content)
    code, said = gpt(monkeypatch, capsys, "inspect-params", "--project", str(project))
    assert code == 1 and f"Project file {project} {fragment}" in said, said


@pytest.mark.parametrize("line, fragment", [
    (f'{{"text": {DEEP_JSON}}}', "line 1 is not read: it nests values deeper than Python can read"),
    (f'{{"text": {DIGITS}}}', "line 1 is not read: it holds an integer of more than 4,300 digits"),
], ids=["nesting", "digits"])
def test_a_jsonl_record_past_the_bounds_is_one_sentence_in_prepare_and_in_task_data(tmp_path, line, fragment):
    from gptcli.data.sources import ReadSettings, ReadState, read_tasks, resolve_inputs
    from gptcli.tasks.data import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(GptError, match=fragment):  # prepare: the reader's tasks are read by its workers
        for task in read_tasks(resolve_inputs([str(path)]), ReadSettings(), ReadState()):
            task.documents()
    with pytest.raises(GptError, match=f"{path} {fragment}"):  # gpt eval --task's data
        read_jsonl(path)


@pytest.mark.parametrize("label", [DIGITS, "²", int("9" * 4000)], ids=["digits", "superscript", "4000-digit-int"])
def test_a_task_label_that_is_no_index_is_one_sentence(label):
    from gptcli.tasks.benchmarks import hellaswag_label

    with pytest.raises(GptError, match="label .* is not the index of one of its") as raised:
        hellaswag_label({"label": label}, "hellaswag.jsonl line 1", 4)
    assert len(str(raised.value)) < 200


def test_a_damaged_gz_input_is_one_sentence(tmp_path):
    """zlib.error escaped prepare as an internal error."""
    from gptcli.data.sources import ReadSettings, ReadState, read_tasks, resolve_inputs

    packed = gzip.compress(os.urandom(4096) * 4)
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(packed[:20] + bytes(200) + packed[220:])
    with pytest.raises(GptError, match=f"{path} is not a readable gzip file .*it may be damaged or cut short"):
        list(read_tasks(resolve_inputs([str(path)]), ReadSettings(), ReadState()))


def test_the_bounds_say_which_one_was_broken():
    from gptcli.parsing import TooLarge, is_whole_number, loads_json, loads_toml, one_json_value

    for parse, text in ((loads_toml, f"a = {DIGITS}"), (loads_json, DIGITS), (one_json_value, DIGITS)):
        with pytest.raises(TooLarge, match="more than 4,300 digits"):
            parse(text)
    for parse, text in ((loads_toml, f"a = {DEEP_TOML}"), (loads_json, DEEP_JSON), (one_json_value, DEEP_JSON)):
        with pytest.raises(TooLarge, match="nests values deeper"):
            parse(text)
    assert loads_toml("a = 12") == {"a": 12} and loads_json("[1, [2]]") == [1, [2]]
    assert [is_whole_number(text) for text in ("12", "²", "٣", "", "-1", DIGITS, "9" * 4300)] == [
        True, False, False, False, False, False, True]


@pytest.mark.parametrize("content", [f'{{"peak_memory": {DIGITS}}}', DEEP_JSON, "[1, 2]"],
                         ids=["digits", "nesting", "not-an-object"])
def test_a_measurement_past_the_bounds_is_left_out_as_unread(tmp_path, content):
    """RUN/measured.json, which `gpt inspect-params --project` puts beside the plan: one it cannot read is left
    out, as one of another version is (a RecursionError or an AttributeError escaped as internal errors)."""
    from gptcli.planner.measured import read_measurement
    from gptcli.rundir import MEASURED_FILE

    (tmp_path / MEASURED_FILE).write_text(content)
    assert read_measurement(tmp_path) is None
