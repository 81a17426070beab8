"""What rank 0 shows while training: the live table (or one line per log_every steps in a log) and, after
`--overfit-batch`, the memorised batch token by token."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...config import Project
from .metrics import format_eta, source_names


class Display:
    """A live table on a terminal, otherwise one line every train.log_every steps."""

    def __init__(self, project: Project, run_dir: Path, first_step: int, tasks: Sequence = ()):
        from rich.console import Console

        self.project, self.run_dir, self.tasks = project, run_dir, list(tasks)
        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            self.console = Console(stderr=True, width=200)  # one line per step in logs, not wrapped at 80
        self.live = None
        self.started = time.perf_counter()
        self.first_step = first_step
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, record: dict) -> None:
        max_steps = self.project.train.max_steps
        done = record["step"] - self.first_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        cells = {"step": f"{record['step']}/{max_steps}", "loss": f"{record['loss']:.4f}",
                 "lr": f"{record['lr']:.3e}", "grad norm": fmt(record["grad_norm"], ".3f"),
                 "tokens/s": fmt(record["tokens_per_s"], ",.0f"), "MFU": fmt(record["mfu"], ".1%"),
                 "ETA": format_eta(per_step * (max_steps - record["step"]))}
        cells.update(eval_cells(record))
        tasks = task_cells(record, self.tasks)
        cells.update(tasks)
        if self.live is not None:
            from rich.table import Table

            table = Table(*cells.keys(), title=f"gpt train: {self.run_dir}")
            table.add_row(*cells.values())
            self.live.update(table)
        elif record["step"] % max(self.project.train.log_every, 1) == 0 or "val loss" in cells or tasks:
            self.console.print("  ".join(f"{k} {v}" for k, v in cells.items()), highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def eval_cells(record: dict) -> dict[str, str]:
    """The val loss a record holds; for a mixture also each source's ("val books") beside the token-weighted
    one."""
    if record.get("eval_loss") is None:
        return {}
    cells = {"val loss": f"{record['eval_loss']:.4f}"}
    for name in source_names(record):
        cells[f"val {name}"] = f"{record[f'eval_loss/{name}']:.4f}"
    return cells


def task_cells(record: dict, tasks: Sequence) -> dict[str, str]:
    """The headline metric of each of `tasks` ([eval] tasks) the record holds, e.g. "hellaswag acc_norm"."""
    from ...tasks.benchmarks import record_key

    cells = {}
    for task in tasks:
        value = record.get(record_key(task.name, task.headline))
        if value is not None:
            cells[f"{task.name} {task.headline}"] = f"{value:.4f}"
    return cells


def fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def show_overfit(engine, batch, tokenizer, rank: int) -> None:
    """Every rank runs the forward of its fixed batch (an objectives.Batch; under ZeRO-3 each rank's forward
    gathers weights from all the others); rank 0 prints its first sequence: input, target and predicted
    token (a position the objective does not count shows no target; a hidden token shows as ·)."""
    inputs, targets = batch.inputs, batch.targets
    engine.eval()
    with torch.no_grad():
        logits, loss = engine(inputs, targets, **batch.model_inputs())
    engine.train()
    if rank != 0:
        return
    predicted = logits.argmax(-1)
    counted = targets != -100
    accuracy = (predicted == targets)[counted].float().mean().item()
    print(f"overfit batch: final loss {loss.item():.4f}; accuracy {accuracy:.3f}")
    print(f"{'pos':>4}  {'input':<16} {'target':<16} {'predicted':<16}")
    hidden = batch.hidden_tokens[0].tolist() if batch.hidden_tokens is not None else [False] * inputs.size(1)
    first = [row.tolist() for row in (inputs[0], targets[0], predicted[0])]
    for position in range(min(len(first[0]), 24)):
        shown = [repr(tokenizer.decode([ids[position]]))[1:-1][:15] for ids in first]
        shown[0] = "·" if hidden[position] else shown[0]
        shown[1] = "" if first[1][position] == -100 else shown[1]
        print(f"{position:>4}  {shown[0]:<16} {shown[1]:<16} {shown[2]:<16}")
