"""metrics.jsonl / metrics.csv on resume and for `gpt plot`: damaged lines are dropped with a note, never a
traceback; TensorBoard points after the resumed step are purged, as metrics.jsonl is cut back."""

from __future__ import annotations

import json
import sys
import types

import pytest

from conftest import assert_user_error, run_gpt
from gptcli.train.metrics import CSV_COLUMNS, MetricsWriter, read_metrics, truncate_metrics

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
    assert csv_lines[0] == ",".join(CSV_COLUMNS)
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["1", "2"]


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
    instances = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.points = log_dir, purge_step, []
        RecordingSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.points.append((tag, step))

    def close(self):
        pass


def test_the_tensorboard_writer_purges_from_the_step_after_the_last_logged_one(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    RecordingSummaryWriter.instances.clear()
    write_run(tmp_path, range(1, 9))
    truncate_metrics(tmp_path, 5)  # a resume from step 5 of a run killed after step 8
    MetricsWriter(tmp_path, tensorboard=True).close()
    (tmp_path / "fresh").mkdir()
    MetricsWriter(tmp_path / "fresh", tensorboard=True).close()
    assert [w.purge_step for w in RecordingSummaryWriter.instances] == [6, 1]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")  # an optional third-party package: `train.tensorboard` needs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def log(steps):
        writer = MetricsWriter(tmp_path, tensorboard=True)
        for step in steps:
            writer.write({"step": step, "loss": float(step)})
        writer.close()

    log(range(1, 9))  # killed after step 8 ...
    truncate_metrics(tmp_path, 5)  # ... and resumed from the checkpoint of step 5
    log(range(6, 11))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert points == [(step, float(step)) for step in range(1, 11)]
