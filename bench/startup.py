"""Start-up time of `gpt` commands against `python -c "import torch"` on the same machine.

Each command runs as a fresh process (as a user types it), N times in turns with the others so that load
from elsewhere on the machine hits them alike; the best wall time of each is kept. Targets:
--help, --list, init and any configuration error under 1 s; `inspect-params gpt2-xl` at most torch's
import time + 1 s.

    python bench/startup.py [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
GPT = [sys.executable, "-m", "gptcli"]

# name, command, target: "abs" = under 1 s; "torch" = at most torch's import time + 1 s; None = no target.
CASES = [
    ("python -c pass", [sys.executable, "-c", "pass"], None),
    ("python -c 'import torch'", [sys.executable, "-c", "import torch"], None),
    ("gpt --help", [*GPT, "--help"], "abs"),
    ("gpt generate --help", [*GPT, "generate", "--help"], "abs"),
    ("gpt inspect-params --list", [*GPT, "inspect-params", "--list"], "abs"),
    ("gpt init DIR --force", [*GPT, "init", "{tmp}", "--force"], "abs"),
    ("config error: inspect-params --set train.lr=nan", [*GPT, "inspect-params", "--set", "train.lr=nan"], "abs"),
    ("config error: generate --top-p 2", [*GPT, "generate", "Hi", "--top-p", "2"], "abs"),
    ("config error: eval --split test", [*GPT, "eval", "--split", "test"], "abs"),
    ("config error: train --set train.lr=nan", [*GPT, "train", "--set", "train.lr=nan"], "abs"),
    ("gpt inspect-params gpt2-xl", [*GPT, "inspect-params", "gpt2-xl"], "torch"),
    ("gpt inspect-params (every preset)", [*GPT, "inspect-params"], "torch"),
]


def wall_time(command: list[str], cwd: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(repeat: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:  # no run.toml here: the commands see no project file
        for _ in range(repeat):
            for name, command, _target in CASES:
                seconds = wall_time([part.format(tmp=tmp) for part in command], tmp, env)
                best[name] = min(best.get(name, float("inf")), seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    best = measure(args.repeat)
    torch_seconds = best["python -c 'import torch'"]
    rows = []
    for name, _command, target in CASES:
        limit = {"abs": 1.0, "torch": torch_seconds + 1.0, None: None}[target]
        rows.append({"command": name, "seconds": round(best[name], 3), "ratio_to_torch_import":
                     round(best[name] / torch_seconds, 2), "target_seconds": limit and round(limit, 3),
                     "meets_target": None if limit is None else best[name] < limit})
    if args.json:
        print(json.dumps({"repeat": args.repeat, "torch_import_seconds": round(torch_seconds, 3), "rows": rows}))
        return
    print(f"best of {args.repeat}; torch import {torch_seconds:.2f} s\n")
    print("| command | seconds | × torch import | target | met |")
    print("|---|---:|---:|---|---|")
    for row in rows:
        target = "" if row["target_seconds"] is None else f"< {row['target_seconds']:.2f} s"
        met = "" if row["meets_target"] is None else ("yes" if row["meets_target"] else "**no**")
        print(f"| `{row['command']}` | {row['seconds']:.2f} | {row['ratio_to_torch_import']:.2f} | {target} | {met} |")


if __name__ == "__main__":
    main()
