"""Where the seconds of a short `gpt train` go besides its steps, on the CPU: the terms of the start-up the
pre-flight estimate adds (planner.STARTUP_SECONDS, OP_BUILD_SECONDS).

Runs `gpt train` as a user does (a fresh process) on the nano preset for a few steps over a small prepared
corpus, N times, and reads the phase lines it prints: the seconds to import DeepSpeed, to start its engine,
and the whole run's wall time less its training steps (metrics.jsonl's `elapsed`). With --op-build the
first run gets an empty torch extensions dir, so it compiles DeepSpeed's CPU communication op as a first
run on a machine does.

    python bench/train_startup.py --corpus ../shared/corpora/tinyshakespeare.txt [--repeat 3] [--op-build] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PHASE = re.compile(r"^\[\s*([0-9.]+)s\] (.*)$")


def gpt(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gptcli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return time.perf_counter() - started, result.stderr


def phases(stderr: str) -> dict[str, float]:
    """The first second at which each phase line starts, by its first words."""
    found = {}
    for line in stderr.splitlines():
        match = PHASE.match(line.strip())
        if match:
            found.setdefault(" ".join(match.group(2).split()[:2]), float(match.group(1)))
    return found


def one_run(work: Path, env: dict, steps: int) -> dict[str, float]:
    run_dir = work / f"run-{time.monotonic_ns()}"
    wall, stderr = gpt(["train", "--set", 'data.dir="data"', "--set", f'project.out_dir="{run_dir}"',
                        "--set", f"train.max_steps={steps}", "--set", "train.eval_every=0"], work, env)
    seen = phases(stderr)
    elapsed = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["elapsed"]
    return {"deepspeed import": seen["reading the"] - seen["loading DeepSpeed"],
            "engine start": seen["training: step"] - seen["starting DeepSpeed"],
            "before the first step": seen["training: step"], "wall": wall, "steps": elapsed,
            "wall less steps": wall - elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, type=Path, help="a text file to prepare (a few hundred KB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--op-build", action="store_true", help="first run with an empty torch extensions dir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
        (work / "corpus.txt").write_bytes(args.corpus.read_bytes()[:300_000])
        gpt(["prepare", "corpus.txt", "--out", "data"], work, env)
        gpt(["init", ".", "--preset", "nano"], work, env)
        rows = []
        if args.op_build:
            fresh = {**env, "TORCH_EXTENSIONS_DIR": str(work / "extensions")}
            rows.append({"op build run": one_run(work, fresh, args.steps)})
        runs = [one_run(work, env, args.steps) for _ in range(args.repeat)]
    medians = {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}
    if args.json:
        print(json.dumps({"median": medians, "runs": runs, **({"op_build": rows[0]} if rows else {})}))
        return
    print(f"median of {args.repeat} runs of nano, {args.steps} steps:")
    for key, value in medians.items():
        print(f"  {key}: {value:.1f} s")
    if rows:
        first = rows[0]["op build run"]
        print(f"  first run with the op build: engine start {first['engine start']:.1f} s "
              f"(op build ≈ {first['engine start'] - medians['engine start']:.0f} s)")


if __name__ == "__main__":
    main()
