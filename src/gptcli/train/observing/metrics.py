"""What a run reports: metrics.jsonl (one object per optimizer step), metrics.csv, the trackers asked for
(trackers.py), tokens/s and MFU, and the loss-curve PNG."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path
from typing import Any, Optional, Sequence

from ...config import ModelConfig
from ...fsutil import atomic_write_text
from ...parsing import is_whole_number, loads_json
from ...paths import open_for_writing, refuse_link
from ...rundir import CSV_FILE, METRICS_FILE, PLOT_FILE
from .trackers import LIBRARY_ERRORS, close_quietly, warn

# The columns of metrics.csv every run has; the tasks a run scores and a mixture's sources add theirs (csv_columns).
BASE_COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed", "eval_loss",
                "eval_perplexity", "skipped_steps", "memory_peak", "memory_reserved_peak"]


def csv_columns(tasks: Sequence = (), sources: Sequence[str] = ()) -> list[str]:
    """metrics.csv's columns for a run that scores `tasks` ([eval] tasks' definitions): each metric of each
    task under its record key; and for a mixture of `sources` (names) each one's tokens taken and eval loss."""
    from ...tasks.benchmarks import record_key

    mixture = [f"{column}/{name}" for column in SOURCE_COLUMNS for name in sources]
    return BASE_COLUMNS + mixture + [record_key(task.name, metric) for task in tasks for metric in task.metrics]


# A mixture's columns per source ("tokens/books"): the tokens taken from it so far, its val loss and the val
# tokens it was measured on (the loop's step_record and evaluate).
SOURCE_COLUMNS = ("tokens", "eval_loss", "eval_tokens")


def source_names(record: dict, column: str = "eval_loss") -> list[str]:
    """The sources a record holds a per-source `column` for ("eval_loss/books" → "books")."""
    prefix = f"{column}/"
    return [key[len(prefix):] for key in record if key.startswith(prefix)]


def peak_for_name(device_name: str, precision: str = "bf16") -> Optional[float]:
    """Peak FLOP/s for a CUDA device name at `precision` (the planner's table of GPUs, Gpu.peak_for: the
    16-bit tensor-core peak for bf16/fp16, TF32's or FP32's for fp32), or None when it is not in the table.
    The live MFU is reported against it, as the planner's MFU is; [train] peak_tflops overrides the lookup."""
    from ...planner import gpu_for_device_name

    gpu = gpu_for_device_name(device_name)
    return gpu.peak_for(precision) if gpu else None


def peak_flops(device: str, peak_tflops: float = 0.0, precision: str = "bf16") -> Optional[float]:
    """Peak FLOP/s of one local accelerator at `precision`: train.peak_tflops when set, else the table; None
    when unknown (a CPU, an unlisted GPU)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device != "cuda":
        return None
    import torch  # here: `gpt plot` reads metrics.jsonl without torch

    if not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(), precision)


def model_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token as `gpt inspect-params` counts them (the planner's arithmetic on the config,
    so ZeRO-3's partitioned parameters do not matter)."""
    from ...planner import flops_per_token

    return flops_per_token(config, seq_len)


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop the lines a killed run wrote after the checkpoint it resumes from (and lines that
    do not parse: a torn last line, bytes that are not UTF-8), so the files read as one run. A link in place
    of either file is refused before anything is read or written (paths.py)."""
    for name in (METRICS_FILE, CSV_FILE):
        refuse_link(Path(run_dir) / name)
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        records, skipped = parse_metrics(path)
        kept = [line for line, record in records if record["step"] <= last_step]
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        if skipped:
            print(f"note: dropped {skipped} unreadable line(s) of {path}.", file=sys.stderr)
    csv_path = Path(run_dir) / CSV_FILE
    if csv_path.is_file():
        columns, rows = read_csv(csv_path)
        kept_rows = [r for r in rows if is_whole_number(r.get("step") or "") and int(r["step"]) <= last_step]
        write_csv(csv_path, columns or BASE_COLUMNS, kept_rows)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """A metrics.csv's columns (its header) and rows; bytes that are not UTF-8 become U+FFFD."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    return [name for name in reader.fieldnames or [] if name], rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """metrics.csv as a whole, replaced at once (a kill leaves the old file or the new one)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def parse_metrics(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """(line, record) for each line of a metrics.jsonl that parses as a step's record, and how many did
    not: a killed run's torn last line, or damage such as bytes that are not UTF-8."""
    records, skipped = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = loads_json(line) if line.strip() else None
            if record is not None and not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except (ValueError, AttributeError):  # UnicodeDecodeError is a ValueError
            skipped += 1
            continue
        if record is not None:
            records.append((line, record))
    return records, skipped


def last_logged_step(run_dir: Path) -> int:
    path = Path(run_dir) / METRICS_FILE
    records = parse_metrics(path)[0] if path.is_file() else []
    return max((record["step"] for _, record in records), default=0)


class MetricsWriter:
    """Rank 0's metric sinks: metrics.jsonl and metrics.csv, each record flushed at once so a killed run
    keeps what it logged, and the trackers (trackers.TrackerFeed), which get the same records: first the
    steps of metrics.jsonl each lacks (those after its last_step()), then each new one. A tracker that
    raises is switched off with one warning; the run goes on without it.

    `columns`: metrics.csv's (csv_columns). A resumed run keeps the file's header; columns it lacks (a
    task added) are added to it, the file rewritten once."""

    def __init__(self, run_dir: Path, trackers: Sequence = (), columns: Optional[list[str]] = None):
        self.run_dir = Path(run_dir)
        self.trackers = list(trackers)
        for record in read_metrics(self.run_dir):  # what a tracker lacks of what metrics.jsonl holds
            self.each_tracker(methodcaller("log", record))  # bound to this record now
        self.jsonl = open_for_writing(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self.csv_handle, self.csv = self.open_csv(columns or csv_columns())

    def open_csv(self, columns: list[str]) -> tuple[Any, csv.DictWriter]:
        """metrics.csv for appending, its header written once: the file's own, with `columns` it lacks added."""
        path = self.run_dir / CSV_FILE
        if path.is_file() and path.stat().st_size > 0:
            held, rows = read_csv(path)
            header = held + [name for name in columns if name not in held]
            if header != held:
                write_csv(path, header, rows)
        else:
            header = columns
            write_csv(path, header, [])
        handle = open_for_writing(path, "a", newline="", encoding="utf-8")
        return handle, csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")

    def write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.csv.writerow(record)
        self.csv_handle.flush()
        self.each_tracker(lambda tracker: tracker.log(record))

    def sample(self, step: int, text: str) -> None:
        self.each_tracker(lambda tracker: tracker.text(step, "sample", text))

    def end(self, step: int, exit_code: int, model_dir: Optional[Path]) -> None:
        """The end of a run that stopped in order (done, or by a signal): loss.png and the model's path."""
        plot = (self.run_dir / PLOT_FILE).resolve()
        model_dir = Path(model_dir).resolve() if model_dir is not None else None
        status = "finished" if exit_code == 0 else "stopped"
        self.each_tracker(lambda tracker: tracker.end(step, status, plot if plot.is_file() else None, model_dir))

    def flush(self) -> None:
        """Before a checkpoint: the trackers write out (or send) what they were given so far."""
        self.each_tracker(lambda tracker: tracker.flush())

    def each_tracker(self, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except LIBRARY_ERRORS as error:  # a library's own failure, whatever its type: never the run's
                self.trackers.remove(tracker)
                warn(tracker.title, error)
                close_quietly(tracker)

    def close(self) -> None:
        self.jsonl.close()
        self.csv_handle.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except LIBRARY_ERRORS as error:
                warn(tracker.title, error, "did not finish cleanly", "what it holds may be incomplete")
        self.trackers = []


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl; lines that do not parse are left out, with a note unless it is
    only the last one (a run being written, or killed mid-line)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records, skipped = parse_metrics(path)
    torn_tail = skipped == 1 and not path.read_bytes().endswith(b"\n")
    if skipped and not torn_tail:
        print(f"note: skipped {skipped} unreadable line(s) of {path}.", file=sys.stderr)
    return [record for _, record in records]


def plotted_records(records: list[dict], path: Path) -> list[dict]:
    """The records that have a loss to draw (a number); the others are left out with a note."""
    from ...errors import GptError

    drawn = [r for r in records if is_number(r.get("loss"))]
    if not drawn:
        raise GptError(f"{path} has no steps to plot yet.")
    if len(drawn) < len(records):
        print(f"note: left out {len(records) - len(drawn)} record(s) of {path} without a loss.", file=sys.stderr)
    return drawn


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """What `gpt plot` may replace: a PNG (its own earlier plot, or any other image of that kind)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


@dataclass
class Curve:
    label: str
    steps: list[int]
    values: list[float]
    style: str  # matplotlib's format string


def loss_curves(records: list[dict]) -> list[Curve]:
    """What loss.png draws: the training loss, the val loss where measured and, for a mixture, each source's
    val loss (the val loss then being their mean weighted by the tokens each scored)."""
    curves = [Curve("train loss", [r["step"] for r in records], [r["loss"] for r in records], "-")]
    evals = [r for r in records if is_number(r.get("eval_loss"))]
    if not evals:
        return curves
    sources = list(dict.fromkeys(name for r in evals for name in source_names(r)))
    curves.append(Curve("val loss (token-weighted over the sources)" if sources else "val loss",
                        [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-"))
    for name in sources:
        points = [r for r in evals if is_number(r.get(f"eval_loss/{name}"))]
        curves.append(Curve(f"val loss, {name}", [r["step"] for r in points], [r[f"eval_loss/{name}"] for r in points],
                            ".--"))
    return curves


def plot_losses(run_dir: Path, out: Optional[Path] = None) -> Path:
    """loss.png: training loss per step (and eval loss where measured; for a mixture also each source's),
    log-scale steps when long."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...errors import GptError
    from ...fsutil import atomic_path, check_output

    if not Path(run_dir).is_dir():
        raise GptError(f"Run dir {run_dir} does not exist.")
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    # Only a PNG is replaced: never the run's metrics, a device, a FIFO, a link, a dir; no dir is created.
    check_output(out, what="PNG image", directory=False, inputs=[Path(run_dir) / METRICS_FILE], replaces=is_png,
                 instead="choose another --out")
    records = plotted_records(read_metrics(run_dir), Path(run_dir) / METRICS_FILE)
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    for curve in loss_curves(records):
        axes.plot(curve.steps, curve.values, curve.style, ms=3, lw=1, label=curve.label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(Path(run_dir).resolve().name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        with atomic_path(out) as tmp:
            figure.savefig(tmp, format="png")
    except OSError as error:  # no space left, a read-only file system
        raise GptError(f"Cannot write {out}: {error.strerror or error}; choose another --out.") from None
    finally:
        plt.close(figure)
    return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
