"""What resuming on another number of ranks costs: converting a ZeRO checkpoint to DeepSpeed's universal
format (train/reshard.py), in seconds and bytes, against the checkpoint itself.

    python bench/reshard.py                         # GPT-2 124M, ZeRO 1, 2 and 3, saved by 2 ranks (CPU)
    python bench/reshard.py --preset nano --stages 2 --json

For each stage `gpt train` saves a one-step checkpoint on 2 CPU ranks (fp32, one 64-token sequence per
rank, on random token shards); the conversion of that checkpoint is then timed in this process as
`gpt train` runs it on rank 0 (`reshard.convert`), and the sizes on disk of the checkpoint and of the
conversion are reported. Writing a checkpoint is timed too, from the run's own log lines, for scale.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

PROJECT = """\
[project]
out_dir = "{out}"
[data]
dir = "{data}"
[model]
preset = "{preset}"
[train]
max_steps = 1
micro_batch_size = 1
seq_len = 64
eval_every = 0
device = "cpu"
precision = "fp32"
[deepspeed]
zero_stage = {stage}
"""


def write_shards(directory: Path) -> None:
    """Random GPT-2 token ids, enough for a step on 2 ranks, with the GPT-2 tokenizer's fingerprint."""
    from gptcli.data.shards import ShardWriter, write_manifest
    from gptcli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    directory.mkdir(parents=True)
    records = []
    for split in ("train", "val"):
        with ShardWriter(directory / f"{split}_000000.bin", tokenizer.vocab_size, tokenizer.fingerprint) as writer:
            writer.write(np.random.default_rng(0).integers(0, tokenizer.vocab_size, 20_000))
            record = writer.close()
        records.append({"file": record.file, "split": split, "tokens": record.tokens, "sha256": record.sha256,
                        "max_id": record.max_id})
    write_manifest(directory, {"shards": records, "tokenizer": {"name": "gpt2", "fingerprint": tokenizer.fingerprint,
                                                                "vocab_size": tokenizer.vocab_size,
                                                                "eot_id": tokenizer.eot_id}})


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(work: Path, data: Path, preset: str, stage: int, ranks: int) -> dict:
    from gptcli.train.state.reshard import convert

    run_dir = work / f"zero{stage}"
    project = work / f"zero{stage}.toml"
    project.write_text(PROJECT.format(out=run_dir, data=data, preset=preset, stage=stage))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    trained = subprocess.run([sys.executable, "-m", "gptcli", "train", "--project", str(project), "--nproc", str(ranks)],
                             env=env, capture_output=True, text=True)
    if trained.returncode != 0:
        raise SystemExit(trained.stderr[-3000:])
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    target = checkpoint / "universal"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert(checkpoint, target)
    seconds = time.perf_counter() - started
    checkpoint_bytes = size_of(checkpoint) - size_of(target)
    result = {"stage": stage, "ranks": ranks, "convert_seconds": round(seconds, 2),
              "checkpoint_bytes": checkpoint_bytes, "universal_bytes": size_of(target),
              "universal_over_checkpoint": round(size_of(target) / checkpoint_bytes, 2)}
    shutil.rmtree(run_dir)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from gptcli.config import project_from_dict
    from gptcli.inspect import inspect_parameters

    parameters = inspect_parameters(project_from_dict({"model": {"preset": args.preset}}).model).total
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        write_shards(work / "data")
        results = [measure(work, work / "data", args.preset, int(stage), args.ranks) for stage in args.stages.split(",")]
    if args.json:
        print(json.dumps({"preset": args.preset, "parameters": parameters, "results": results}))
        return
    print(f"{args.preset}: {parameters:,} parameters, checkpoints saved by {args.ranks} ranks (fp32, CPU)")
    for r in results:
        print(f"  ZeRO-{r['stage']}: conversion {r['convert_seconds']:.1f} s; checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB, "
              f"universal {r['universal_bytes'] / 1e9:.2f} GB ({r['universal_over_checkpoint']:.2f}x)")


if __name__ == "__main__":
    main()
