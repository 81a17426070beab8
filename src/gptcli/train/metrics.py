"""What a run reports: metrics.jsonl (one object per optimizer step), metrics.csv, optional TensorBoard,
tokens/s and MFU, the live display, and the loss-curve PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
CSV_COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed", "eval_loss",
               "eval_perplexity", "skipped_steps"]

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
    """On resume, drop the lines a killed run wrote after the checkpoint it resumes from."""
    for name, keep in ((METRICS_FILE, lambda line: json.loads(line)["step"] <= last_step),):
        path = run_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                if line.strip() and keep(line):
                    kept.append(line)
            except (ValueError, KeyError):
                break  # a torn last line of a killed run
        path.write_text("".join(f"{line}\n" for line in kept))
    csv_path = run_dir / CSV_FILE
    if csv_path.is_file():
        rows = list(csv.DictReader(csv_path.open()))
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= last_step)


class MetricsWriter:
    """Rank 0's metric sinks; every record is flushed at once so a killed run keeps what it logged."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.jsonl = (run_dir / METRICS_FILE).open("a")
        csv_path = run_dir / CSV_FILE
        new_csv = not csv_path.is_file() or csv_path.stat().st_size == 0
        self.csv_handle = csv_path.open("a", newline="")
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
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

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
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a torn last line while the run is being written
    return records


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
