"""What a run reports: metrics.jsonl (one object per optimizer step), metrics.csv, optional TensorBoard,
tokens/s and MFU, the live display, and the loss-curve PNG."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
CSV_COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed", "eval_loss",
               "eval_perplexity", "skipped_steps",
               "hellaswag_acc", "hellaswag_acc_norm", "lambada_acc", "lambada_perplexity"]  # [eval] tasks

# Dense (no sparsity) bf16 tensor-core peaks of one GPU, from the vendor data sheets, matched against
# torch.cuda.get_device_name() in this order (so "H100 PCIe" wins over "H100", "GH200" over "H200").
# H800 is H100 silicon with slower links: the same compute. MFU is reported against these whatever the
# precision; [train] peak_tflops overrides the lookup.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),  # H100 SXM: "H100 80GB HBM3"
    ("H800 PCIe", 756e12), ("H800", 989e12),
    ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10G", 125e12), ("L4", 121e12), ("RTX 4090", 165e12),
]


def peak_for_name(device_name: str) -> Optional[float]:
    """Peak FLOP/s for a CUDA device name, or None when it is not in the table."""
    return next((value for key, value in PEAK_FLOPS if key in device_name), None)


def peak_flops(device: str, peak_tflops: float = 0.0) -> Optional[float]:
    """Peak FLOP/s of one local accelerator: train.peak_tflops when set, else the table; None when
    unknown (a CPU, an unlisted GPU)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name())


def model_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token as `gpt inspect-params` counts them (on a meta model, so ZeRO-3's
    partitioned parameters do not matter)."""
    from ..inspect import inspect_parameters

    return inspect_parameters(config, seq_len=seq_len).flops_per_token


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop the lines a killed run wrote after the checkpoint it resumes from (and lines that
    do not parse: a torn last line, bytes that are not UTF-8), so the files read as one run."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        records, skipped = parse_metrics(path)
        kept = [line for line, record in records if record["step"] <= last_step]
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        if skipped:
            print(f"note: dropped {skipped} unreadable line(s) of {path}.", file=sys.stderr)
    csv_path = Path(run_dir) / CSV_FILE
    if csv_path.is_file():
        text = csv_path.read_bytes().decode("utf-8", errors="replace")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        with csv_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= last_step)


def parse_metrics(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """(line, record) for each line of a metrics.jsonl that parses as a step's record, and how many did
    not: a killed run's torn last line, or damage such as bytes that are not UTF-8."""
    records, skipped = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = json.loads(line) if line.strip() else None
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
    """Rank 0's metric sinks; every record is flushed at once so a killed run keeps what it logged."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.jsonl = (run_dir / METRICS_FILE).open("a", encoding="utf-8")
        csv_path = run_dir / CSV_FILE
        new_csv = not csv_path.is_file() or csv_path.stat().st_size == 0
        self.csv_handle = csv_path.open("a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.csv_handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self.csv.writeheader()
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from ..errors import GptError

                raise GptError("train.tensorboard is true but the tensorboard package is not installed "
                               "(pip install tensorboard).") from None
            # TensorBoard shows what metrics.jsonl holds: points a killed run logged after the step this
            # run resumes from (metrics.jsonl has been cut back to it) are purged, not shown twice.
            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=last_logged_step(run_dir) + 1)

    def write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.csv.writerow(record)
        self.csv_handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.jsonl.close()
        self.csv_handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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


def plot_losses(run_dir: Path, out: Optional[Path] = None) -> Path:
    """loss.png: training loss per step (and eval loss where measured), log-scale steps when long."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import GptError

    if not Path(run_dir).is_dir():
        raise GptError(f"Run dir {run_dir} does not exist.")
    records = read_metrics(run_dir)
    if not records:
        raise GptError(f"{Path(run_dir) / METRICS_FILE} has no steps to plot yet.")
    out = out or Path(run_dir) / PLOT_FILE
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train loss")
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, label="val loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(Path(run_dir).resolve().name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    from ..fsutil import atomic_path

    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
