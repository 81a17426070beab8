"""A tracker for gptcli: it mirrors each step's numbers into RUN/mirror.jsonl, one JSON object per step
({"step": 12, "loss": 3.21, ...}), a file of its own that reads back what it holds.

    [train] trackers = ["example_tracker"]        (installed: pip install ./examples/plugins)
    [train] trackers = ["tracker.py:start"]        (this file beside the project file)

The protocol (docs/extending.md): `start(run_dir, config, resume_step)` makes the tracker; it drops what
it holds above resume_step (the steps a killed run logged after the checkpoint the run resumes from) and
`last_step()` says what it still holds, read from its own file; gptcli then sends the steps of
metrics.jsonl after that one, and each new step, once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MIRROR_FILE = "mirror.jsonl"


class Mirror:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        held = [line for line in read_lines(path) if json.loads(line)["step"] <= resume_step]
        write_atomically(path, "".join(f"{line}\n" for line in held))
        self.held = json.loads(held[-1])["step"] if held else 0
        self.handle = path.open("a", encoding="utf-8")

    def last_step(self) -> int:
        return self.held

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.handle.flush()  # a killed run keeps every step it was given

    def close(self) -> None:
        self.handle.close()


def start(run_dir: Path, config: dict, resume_step: int) -> Mirror:
    """The factory gptcli calls on rank 0; `config` is the resolved project ({"train": {...}, ...}) with
    "parameters", unused here."""
    return Mirror(Path(run_dir) / MIRROR_FILE, resume_step)


start.title = "the JSONL mirror"  # how gptcli's messages name it


def read_lines(path: Path) -> list[str]:
    """The whole lines of the file: a line a kill cut short (no newline, or not JSON) is not held."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            if line.endswith("\n") and isinstance(json.loads(line).get("step"), int):
                lines.append(line.rstrip("\n"))
        except ValueError:
            pass
    return lines


def write_atomically(path: Path, text: str) -> None:
    """Replace the file at once: a kill leaves the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
