"""The plan against what a run measured of itself, as a user sees it: `gpt train` for a few steps, then
`gpt inspect-params --project P --json`, which puts the planner's figures beside RUN/measured.json.

On the CPU that is the peak resident memory per rank (VmHWM, the largest over the ranks) against the plan's
tensors plus the process (planner.CPU_PROCESS_BYTES), and the seconds per step against the plan's estimate
from a matmul timed on this CPU. Each preset runs in a fresh project over a small prepared corpus.

    python bench/plan_vs_measured.py --corpus ../shared/corpora/tinyshakespeare.txt [--preset nano tiny]
        [--steps 6] [--set train.micro_batch_size=8 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def gpt(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run([sys.executable, "-m", "gptcli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return result.stdout


def one_preset(work: Path, env: dict, preset: str, steps: int, overrides: list[str]) -> dict:
    """Train `preset` for `steps` steps on the CPU, then read the comparison inspect-params prints."""
    sets = [f"model.preset={preset}", 'data.dir="data"', f'project.out_dir="run-{preset}"', f"train.max_steps={steps}",
            "train.eval_every=0", "train.sample_every=0", 'train.device="cpu"', *overrides]
    args = [item for key in sets for item in ("--set", key)]
    gpt(["train", *args], work, env)
    report = json.loads(gpt(["inspect-params", "--json", *args], work, env))
    measured = report["measured"]
    if measured["differences"]:
        raise RuntimeError(f"the measurement does not hold for the plan: {measured['differences']}")
    rows = {row["what"]: row for row in measured["comparisons"]}
    memory = rows["peak resident memory per rank (VmHWM)"]
    step = rows["seconds per step"]
    plan = report["plan"]
    return {"preset": preset, "micro_batch": plan["micro_batch"], "seq_len": plan["seq_len"],
            "planned_tensors": plan["memory"]["peak"], "planned": memory["planned"], "measured": memory["measured"],
            "ratio": memory["ratio"], "step_planned": step["planned"], "step_measured": step["measured"],
            "step_ratio": step["ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, type=Path, help="a text file to prepare (a few hundred KB)")
    parser.add_argument("--preset", nargs="+", default=["nano", "tiny"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="another override, as gpt --set")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
        (work / "corpus.txt").write_bytes(args.corpus.read_bytes()[:300_000])
        gpt(["prepare", "corpus.txt", "--out", "data"], work, env)
        rows = [one_preset(work, env, preset, args.steps, args.overrides) for preset in args.preset]
    if args.json:
        print(json.dumps(rows))
        return
    gib = 2**30
    print("peak resident memory per rank: planned (tensors + the process) against measured (VmHWM)")
    for row in rows:
        print(f"  {row['preset']}, micro batch {row['micro_batch']} × {row['seq_len']} tokens: planned "
              f"{row['planned'] / gib:.2f} GiB (tensors {row['planned_tensors'] / gib:.2f}), measured "
              f"{row['measured'] / gib:.2f} GiB, measured/planned {row['ratio']:.2f}; seconds per step planned "
              f"{row['step_planned']:.3g}, measured {row['step_measured']:.3g} ({row['step_ratio']:.2f})")


if __name__ == "__main__":
    main()
