"""Training throughput: the DeepSpeed path of `gpt train` against a plain-PyTorch loop, in one run.

    python bench/train.py            # CPU: tiny preset; GPU (when CUDA is present): GPT-2 124M, T=1024, bf16
    python bench/train.py --steps 30 --json

Both sides train the same model (same init), on the same batches, with the same AdamW parameter groups,
gradient clipping and learning rate; the reference is the simplest correct training step
(forward, backward, clip, step, zero_grad). The DeepSpeed side is engine.py's `initialize` with the
project's [deepspeed] settings, as `gpt train` builds it. The two sides are timed in alternating rounds
(median kept) so that load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from gptcli.config import project_from_dict  # noqa: E402
from gptcli.model import build_model  # noqa: E402


def setup(cuda: bool):
    if cuda:
        model = {"preset": "gpt2", "vocab_multiple": 128}
        train = {"micro_batch_size": 16, "seq_len": 1024, "precision": "bf16", "compile": True, "grad_clip": 1.0}
        deepspeed = {"zero_stage": 1}
    else:
        model = {"preset": "tiny"}
        train = {"micro_batch_size": 8, "seq_len": 128, "precision": "fp32", "grad_clip": 1.0}
        deepspeed = {"zero_stage": 1}
    return project_from_dict({"model": model, "train": train, "deepspeed": deepspeed})


def batches(project, steps: int, device: str):
    generator = torch.Generator().manual_seed(0)
    B, T, V = project.train.micro_batch_size, project.train.seq_len, project.model.vocab_size
    tokens = torch.randint(0, V, (steps, B, T + 1), generator=generator)
    return [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in tokens]


def timed(step_fn, data, sync) -> float:
    sync()
    start = time.perf_counter()
    for inputs, targets in data:
        step_fn(inputs, targets)
    sync()
    return time.perf_counter() - start


def interleaved(step_fns: dict, data, warmup: int, rounds: int, sync) -> dict:
    """Seconds per timed batch set for each side: warm both up, then alternate them `rounds` times and
    keep each side's median, so a busy machine slows both sides alike."""
    for step_fn in step_fns.values():
        timed(step_fn, data[:warmup], sync)
    times = {name: [] for name in step_fns}
    for _ in range(rounds):
        for name, step_fn in step_fns.items():
            times[name].append(timed(step_fn, data[warmup:], sync))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def reference_loop(project, device: str):
    """Plain PyTorch: the same model, AdamW groups and clipping; autocast bf16 on a GPU."""
    from gptcli.optimizers import ADAMW
    from gptcli.train.engine import parameter_groups

    torch.manual_seed(0)
    model = build_model(project.model, device=device)
    if project.train.compile:
        model = torch.compile(model)
    train = project.train
    fused = {"fused": True} if device == "cuda" else {"foreach": False}
    optimizer = torch.optim.AdamW(parameter_groups(model, ADAMW, train), lr=train.lr,
                                  betas=(train.beta1, train.beta2), eps=train.eps, **fused)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step(inputs, targets):
        with autocast:
            _, loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def deepspeed_loop(project, device: str):
    from gptcli.batch import batch_layout
    from gptcli.train.engine import initialize, prepare_environment, resolve_precision

    prepare_environment(device)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    torch.manual_seed(0)
    model = build_model(project.model, device=device)
    layout = batch_layout(project.train, project.seq_len, 1)
    engine = initialize(project, model, layout, resolve_precision(project, device), device)
    if project.train.compile:
        engine.compile()

    def step(inputs, targets):
        _, loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="timed steps per round (default 10 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 3 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per side (median kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    steps, warmup = args.steps or (30 if cuda else 10), args.warmup or (10 if cuda else 3)
    project = setup(cuda)
    data = batches(project, steps + warmup, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = steps * project.train.micro_batch_size * project.train.seq_len
    step_fns = {"reference": reference_loop(project, device), "deepspeed": deepspeed_loop(project, device)}
    seconds = interleaved(step_fns, data, warmup, args.rounds, sync)
    results = {name: tokens / value for name, value in seconds.items()}
    report = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
              "model": project.model.preset, "micro_batch": project.train.micro_batch_size,
              "seq_len": project.train.seq_len, "torch_threads": torch.get_num_threads(),
              "tokens_per_s": results, "ratio": results["deepspeed"] / results["reference"]}
    if cuda:
        from gptcli.train.observing.metrics import model_flops_per_token, peak_flops

        flops = model_flops_per_token(project.model, project.train.seq_len)
        peak = peak_flops("cuda") or 989e12
        report["mfu"] = {name: flops * rate / peak for name, rate in results.items()}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
