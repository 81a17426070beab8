"""metrics.jsonl / metrics.csv on resume and for `gpt plot`: damaged lines are dropped with a note, never a
traceback; metrics.csv's columns are those of the tasks the run scores and its header is written once;
TensorBoard points after what it flushed are purged and sent again from metrics.jsonl (the trackers
themselves: test_trackers.py)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from conftest import assert_user_error, run_gpt
from gptcli.config import load_project
from gptcli.train.observing.metrics import BASE_COLUMNS, MetricsWriter, csv_columns, read_metrics, truncate_metrics
from gptcli.train.observing.trackers import start_trackers

GARBAGE = b"\xff\xfe{\"step\": \x9c\n"  # not UTF-8: what a bad disk block or a stray binary write leaves


def write_run(run_dir, steps, garbage_after=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in steps:
        lines.append(json.dumps({"step": step, "loss": 10.0 - step / 10}).encode() + b"\n")
        if step == garbage_after:
            lines.append(GARBAGE)
    (run_dir / "metrics.jsonl").write_bytes(b"".join(lines))


def test_truncate_keeps_the_steps_up_to_the_resume_step_and_drops_bytes_that_are_not_utf8(tmp_path, capsys):
    write_run(tmp_path, range(1, 9), garbage_after=3)
    (tmp_path / "metrics.csv").write_bytes(b"step,loss\n1,10\n\xff\xfe,\x9c\n2,9.9\n7,9.3\n")
    truncate_metrics(tmp_path, 5)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "step,loss"  # the file's own header, kept
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["1", "2"]


def test_the_csv_columns_are_those_of_the_tasks_scored_and_a_resume_keeps_the_header(tmp_path):
    """A task's metrics (a plugin's too) get columns; a resumed run that scores one more task adds its
    columns to the header once, the rows written before kept under theirs."""
    from gptcli.tasks.benchmarks import HELLASWAG, LAMBADA

    def run(columns, steps, resume_from=None):
        if resume_from is not None:
            truncate_metrics(tmp_path, resume_from)
        writer = MetricsWriter(tmp_path, (), columns)
        for step in steps:
            writer.write({"step": step, "loss": 1.0 / step, "hellaswag_acc": 0.25, "lambada_acc": 0.5})
        writer.close()

    run(csv_columns([HELLASWAG]), [1, 2, 3])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == BASE_COLUMNS + ["hellaswag_acc", "hellaswag_acc_norm"]
    run(csv_columns([HELLASWAG, LAMBADA]), [3, 4], resume_from=2)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == header + ["lambada_acc", "lambada_perplexity"]
    rows = [dict(zip(lines[0].split(","), line.split(","), strict=True)) for line in lines[1:]]
    assert [(r["step"], r["hellaswag_acc"], r["lambada_acc"]) for r in rows] == [
        ("1", "0.25", ""), ("2", "0.25", ""), ("3", "0.25", "0.5"), ("4", "0.25", "0.5")]


def test_a_torn_last_line_is_cut_without_a_note(tmp_path, capsys):
    write_run(tmp_path, range(1, 5))
    with open(tmp_path / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 5, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_read_metrics_skips_damaged_lines_with_a_note(tmp_path, capsys):
    write_run(tmp_path, range(1, 6), garbage_after=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert "skipped 1 unreadable line" in capsys.readouterr().err


@pytest.mark.slow
def test_gpt_plot_draws_a_run_whose_metrics_hold_bytes_that_are_not_utf8(tmp_path):
    write_run(tmp_path / "run", range(1, 6), garbage_after=2)
    result = run_gpt("plot", tmp_path / "run", "--out", tmp_path / "curve.png")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable line" in result.stderr
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "run" / "metrics.jsonl").write_bytes(GARBAGE * 3)
    assert_user_error(run_gpt("plot", tmp_path / "run"), "no steps to plot")


class RecordingSummaryWriter:
    """torch's SummaryWriter as the TensorBoard tracker uses it: the purge step and the steps written."""

    instances = []

    def __init__(self, log_dir, purge_step=None, **_):
        self.log_dir, self.purge_step, self.steps = log_dir, purge_step, []
        self.file_writer = self
        RecordingSummaryWriter.instances.append(self)

    def add_summary(self, summary, step):
        self.steps.append(step)

    def add_text(self, tag, text, step):
        pass

    def flush(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("flushed, purge_step, sent", [(None, 1, [1, 2, 3, 4, 5]), (3, 4, [4, 5]), (7, 6, [])])
def test_tensorboard_purges_after_what_it_flushed_and_gets_the_rest_again(tmp_path, monkeypatch, flushed,
                                                                          purge_step, sent):
    """A resume from step 5 of a run killed after step 8: TensorBoard holds the steps its writer flushed when
    gptcli asked (before a checkpoint; RUN/trackers.json says which); the events after them (or after step
    5) are purged and the steps of metrics.jsonl after them sent again."""
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingSummaryWriter
    fake.__path__ = []  # a package, as torch's is: the tracker also imports its summary module
    summary = types.ModuleType("torch.utils.tensorboard.summary")
    summary.scalar = lambda *args, **kwargs: types.SimpleNamespace(value=[])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard.summary", summary)
    RecordingSummaryWriter.instances.clear()
    project = load_project(None, ['model.preset="nano"', 'train.trackers=["tensorboard"]'])
    write_run(tmp_path, range(1, 9))
    if flushed is not None:
        (tmp_path / "trackers.json").write_text(json.dumps({"tensorboard": {"flushed": flushed}}))
    truncate_metrics(tmp_path, 5)
    writer = MetricsWriter(tmp_path, start_trackers(project, tmp_path, 5))
    writer.write({"step": 6, "loss": 9.4})
    writer.close()
    [resumed] = RecordingSummaryWriter.instances
    assert resumed.purge_step == purge_step and resumed.steps == sent + [6]
    assert json.loads((tmp_path / "trackers.json").read_text())["tensorboard"] == {"flushed": 6}


@pytest.mark.parametrize("out, fragment", [
    ("null", "null is a character device, not a regular file"),  # a private node, never the machine's /dev/null
    ("fifo", "is a FIFO, not a regular file"),
    ("run/metrics.jsonl", "metrics.jsonl is an input of this command"),
    ("run/config.resolved.toml", "exists and is not a PNG image"),
    ("no/such/dir/x.png", "does not exist (it is not created silently)"),
    ("notes.txt/x.png", "notes.txt is a file, not a directory"),
    (".", "is a directory, not a regular file"),
    ("link.png", "is a symbolic link"),
])
def test_gpt_plot_writes_only_a_png_and_nowhere_else(tmp_path, out, fragment):
    """`gpt plot --out` once replaced /dev/null and a FIFO with a PNG, overwrote the run's metrics, created
    missing directories and raised OSError for a directory: each is one sentence now, nothing touched."""
    import os
    import stat

    from gptcli.errors import GptError
    from gptcli.train.observing.metrics import plot_losses

    write_run(tmp_path / "run", [1, 2])
    (tmp_path / "run" / "config.resolved.toml").write_text("[project]\n")
    (tmp_path / "notes.txt").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.png").symlink_to(tmp_path / "elsewhere.png")
    if out == "null":
        from conftest import private_null_device

        private_null_device(tmp_path)
    target = tmp_path / out
    before = {str(p): (p.lstat().st_mode, p.read_bytes() if stat.S_ISREG(p.lstat().st_mode) else None)
              for p in tmp_path.rglob("*")}
    with pytest.raises(GptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plot_losses(tmp_path / "run", target)
    after = {str(p): (p.lstat().st_mode, p.read_bytes() if stat.S_ISREG(p.lstat().st_mode) else None)
             for p in tmp_path.rglob("*")}
    assert after == before  # the FIFO is still a FIFO, the device node a device, the metrics the metrics


def test_gpt_plot_replaces_its_own_png(tmp_path):
    from gptcli.train.observing.metrics import PNG_SIGNATURE, plot_losses

    write_run(tmp_path / "run", [1, 2])
    (tmp_path / "curve.png").write_bytes(PNG_SIGNATURE + b"an older plot")
    assert plot_losses(tmp_path / "run", tmp_path / "curve.png") == tmp_path / "curve.png"
    assert len((tmp_path / "curve.png").read_bytes()) > 1000
