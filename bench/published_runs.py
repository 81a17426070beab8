"""The planner against published GPT-2 runs: each run's configuration as gptcli would run it, what happened
(it ran, or ran out of memory; its seconds per optimizer step), and the planner's answer for it (fits or not,
with the memory it plans against the GPU's; the seconds per step it estimates and their ratio to the
published ones). docs/planning.md's table "Published runs" is this script's output, and
tests/test_published_runs.py holds the two equal, so the table cannot drift from the planner.

    python bench/published_runs.py            # the Markdown table
    python bench/published_runs.py --json     # one object per run
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GPT2_STEP = ("train.global_batch_tokens=524288",)


@dataclass(frozen=True)
class PublishedRun:
    """One published run: its configuration as `--set` overrides on a GPU of the planner's table, what
    happened, and where it is published. `seconds_per_step`: the published time of one optimizer step (or
    derived from the published throughput, as `note` says); None where only the outcome is published."""

    name: str
    gpu: str
    gpus: int
    overrides: tuple[str, ...]
    ran: bool  # False: it ran out of memory
    seconds_per_step: Optional[float]
    source: str
    note: str = ""
    memory_comparable: bool = True  # False: a stack whose memory is not gptcli's (llm.c's own C/CUDA)


RUNS: tuple[PublishedRun, ...] = (
    PublishedRun("nanoGPT, GPT-2 124M", "A100-40GB", 8,
                 ("model.preset=gpt2", "train.micro_batch_size=12", "train.grad_accum_steps=5", "deepspeed.zero_stage=0"),
                 True, 0.562, "karpathy/nanoGPT README (4 days, 600k steps), #110 (562 ms per step)",
                 "DDP as ZeRO-0; bf16, torch.compile"),
    PublishedRun("nanoGPT, GPT-2 124M", "RTX-4090", 1,
                 ("model.preset=gpt2", "train.micro_batch_size=12", "train.grad_accum_steps=40", "deepspeed.zero_stage=0"),
                 True, 4.64, "karpathy/nanoGPT #179, #182 (29% MFU as nanoGPT counts it, against 312 TFLOP/s)",
                 "seconds per step from 29% of 312 TFLOP/s at 855 MFLOPs per token"),
    PublishedRun("nanoGPT, GPT-2 124M", "V100-16GB", 1,
                 ("model.preset=gpt2", "train.micro_batch_size=32", "deepspeed.zero_stage=0", "train.precision=fp16",
                  "train.compile=false"), False, None,
                 "karpathy/nanoGPT #88 (batch_size 32 on 15.78 GiB: out of memory)"),
    PublishedRun("modded-nanogpt, GPT-2 124M", "L40S", 8,
                 ("model.preset=gpt2", "train.micro_batch_size=64", "deepspeed.zero_stage=0"), False, None,
                 "KellerJordan/modded-nanogpt #12 (per-device batch 64 on 8 L40S: out of memory)"),
    PublishedRun("modded-nanogpt, GPT-2 124M", "L40S", 8,
                 ("model.preset=gpt2", "train.micro_batch_size=32", "deepspeed.zero_stage=0"), True, None,
                 "KellerJordan/modded-nanogpt #12 (batch 32: it ran)"),
    PublishedRun("DeepSpeed ZeRO tutorial, GPT-2 1.5B, ZeRO-0", "V100-32GB", 8,
                 ("model.preset=gpt2-xl", "model.n_head=16", "train.micro_batch_size=1", "deepspeed.zero_stage=0",
                  "train.precision=fp16"), False, None,
                 "deepspeed.ai/tutorials/zero (Megatron-LM GPT-2 1.5B, batch 1 per V100 32GB: out of memory)",
                 "48 layers, 1600 wide, 16 heads as the tutorial sets them"),
    PublishedRun("DeepSpeed ZeRO tutorial, GPT-2 1.5B, ZeRO-1", "V100-32GB", 8,
                 ("model.preset=gpt2-xl", "model.n_head=16", "train.micro_batch_size=1", "deepspeed.zero_stage=1",
                  "train.precision=fp16"), True, None, "deepspeed.ai/tutorials/zero (with ZeRO stage 1 it trains)"),
    PublishedRun("build-nanogpt, GPT-2 124M", "A100-80GB", 8,
                 ("model.preset=gpt2", "train.micro_batch_size=64", "deepspeed.zero_stage=0", *GPT2_STEP), True, 0.472,
                 "debtirthasaha.github.io/blog/2026/gpt2-124m (1.1M tokens/s, ~127 steps a minute)",
                 "A100 SXM4; 80 GB assumed (the blog does not say; batch 64 as build-nanogpt sets it)"),
    PublishedRun("llm.c, GPT-2 124M", "A100-80GB", 8, ("model.preset=gpt2", "train.micro_batch_size=64", *GPT2_STEP),
                 True, 0.300, "karpathy/llm.c scripts/run_gpt2_124M.sh (~300 ms per step)", memory_comparable=False),
    PublishedRun("llm.c, GPT-2 350M", "A100-80GB", 8,
                 ("model.preset=gpt2-medium", "train.micro_batch_size=64", *GPT2_STEP), True, 0.820,
                 "karpathy/llm.c scripts/run_gpt2_350M.sh (~820 ms per step)", memory_comparable=False),
    PublishedRun("llm.c, GPT-2 774M", "A100-80GB", 8,
                 ("model.preset=gpt2-large", "train.micro_batch_size=32", *GPT2_STEP), True, 1.7,
                 "karpathy/llm.c scripts/run_gpt2_774M.sh (~1.7 s per step)", memory_comparable=False),
    PublishedRun("llm.c, GPT-2 1.5B", "H100-SXM", 8,
                 ("model.preset=gpt2-xl", "train.micro_batch_size=16", "train.global_batch_tokens=1048576"), True, 2.8,
                 "karpathy/llm.c scripts/run_gpt2_1558M.sh (2.8 s per step), discussion #677 (24 hours)",
                 memory_comparable=False),
    PublishedRun("llm.c, GPT-2 124M", "H100-SXM", 8, ("model.preset=gpt2", "train.micro_batch_size=64", *GPT2_STEP),
                 True, 0.143, "KellerJordan/modded-nanogpt README (the llm.c baseline: 45 minutes on 8 H100s)",
                 "45 minutes over run_gpt2_124M.sh's 18,865 steps", memory_comparable=False),
)
TIME_TOLERANCE = 0.35  # the bound on most runs: |planned − published| / published


def planner_answer(run: PublishedRun) -> dict:
    """The plan of `run` on its GPUs: whether it fits, the memory it needs against the GPU's, the seconds
    per step and the MFU it assumes."""
    from gptcli import planner
    from gptcli.config import apply_overrides, project_from_dict

    project = project_from_dict(apply_overrides({}, list(run.overrides)))
    gpu = planner.find_gpu(run.gpu)
    plan = planner.plan_run(project, gpu=gpu, capacity=gpu.memory, ranks=run.gpus)
    step = plan.step_seconds
    error = None if run.seconds_per_step is None or step is None else step / run.seconds_per_step - 1
    return {"fits": plan.fits, "required": plan.memory.required, "capacity": plan.capacity, "mfu": plan.mfu,
            "seconds_per_step": step, "error": error,
            "agrees": plan.fits == run.ran if run.memory_comparable else None}


def row(run: PublishedRun) -> str:
    answer = planner_answer(run)
    gib = 2**30
    outcome = "ran" if run.ran else "out of memory"
    fits = "fits" if answer["fits"] else "does not fit"
    memory = f"{answer['required'] / gib:.1f} of {answer['capacity'] / gib:.1f} GiB: {fits}"
    agrees = {True: "yes", False: "no", None: "not compared (llm.c's memory is its own)"}[answer["agrees"]]
    published = "—" if run.seconds_per_step is None else f"{run.seconds_per_step:.3g} s"
    planned = f"{answer['seconds_per_step']:.3g} s at {answer['mfu']:.0%} MFU"
    error = "—" if answer["error"] is None else f"{answer['error']:+.0%}"
    config = f"{run.gpus} × {run.gpu}: " + ", ".join(item.split(".", 1)[1] for item in run.overrides)
    return (f"| {run.name} | {config} | {outcome} | {memory} | {agrees} | {published} | {planned} | {error} | "
            f"{run.source}{'; ' + run.note if run.note else ''} |")


HEADER = ("| run | configuration as gptcli runs it | published | planner: memory per GPU | agrees | published "
          "s/step | planner s/step | time error | source |\n|---|---|---|---|---|---:|---:|---:|---|")


def table() -> str:
    return "\n".join([HEADER, *map(row, RUNS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.json:
        for run in RUNS:
            print(json.dumps({"name": run.name, "gpu": run.gpu, "gpus": run.gpus, **planner_answer(run)}))
        return
    print(table())


if __name__ == "__main__":
    main()
