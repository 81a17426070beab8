"""The training loop: steps, evaluation, samples, metrics, checkpoints, signals and faults.

Every rank runs this. One all-reduce per optimizer step carries the mean loss and the stop request, so
all ranks agree on the numbers they log, on a non-finite loss (stop before the optimizer step) and on a
SIGTERM/SIGINT (finish the step, save, exit with 128 + the signal number: 143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Project
from ..errors import GptError
from . import checkpoint
from .chatter import library_output_to
from .engine import BatchLayout, batch_layout, device_type, initialize, prepare_environment, resolve_precision
from .metrics import MetricsWriter, format_eta, model_flops_per_token, peak_flops, plot_losses, truncate_metrics
from .phases import acknowledge_stop, deepspeed_phase, show_phase, training_starts
from .preflight import announce
from .schedule import schedule_for

DIVERGED_EXIT_CODE = 4  # a non-finite loss or gradient norm stopped the run


@dataclass
class TrainOptions:
    resume: str = "auto"  # auto | required | never
    overfit_batch: bool = False


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    exit_code: int = 0
    final_eval_loss: Optional[float] = None
    model_dir: Optional[Path] = None


class Faults:
    """Injected faults for tests, from GPTCLI_FAULT: comma-separated `kind@step` with kind one of
    nan (a NaN loss), kill (SIGKILL this rank after the step), crash_in_save (die inside the save),
    sigterm (SIGTERM to this rank before the step). `kind@step@rank` restricts it to one rank."""

    def __init__(self, spec: str, rank: int):
        self.faults = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split("@")
            if len(parts) == 3 and int(parts[2]) != rank:
                continue
            self.faults.add((parts[0], int(parts[1])))

    def has(self, kind: str, step: int) -> bool:
        return (kind, step) in self.faults

    def maybe_crash_in_save(self, step: int) -> None:
        if self.has("crash_in_save", step):
            os._exit(70)


class StopRequest:
    """Remembers a SIGTERM/SIGINT; the loop finishes the step, saves and exits."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        acknowledge_stop(self, signum)  # "stopping after this step…", unless the watcher thread said it
        self.signum = self.signum or signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@dataclass
class Run:
    """Everything the loop carries between steps."""

    project: Project
    engine: object
    layout: BatchLayout
    loader: object
    val_loader: object
    tokenizer: object
    run_dir: Path
    rank: int
    device: str
    faults: Faults
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    elapsed: float = 0.0
    fixed_batch: Optional[tuple] = None
    writer: Optional[MetricsWriter] = None
    flops_per_token: int = 0
    peak: Optional[float] = None


def train(project: Project, options: TrainOptions) -> TrainResult:
    """Train per the project on this rank; returns what happened (the exit code included)."""
    device = device_type(project)
    prepare_environment(device)
    announce(project, device, "never" if options.overfit_batch else options.resume)  # the plan and its estimate
    show_phase("loading DeepSpeed")
    run = setup(project, options, device)
    stop = StopRequest()
    stop.install()
    training_starts(run, stop)
    try:
        return loop(run, stop, options)
    finally:
        stop.restore()
        if run.writer is not None:
            run.writer.close()


def setup(project: Project, options: TrainOptions, device: str) -> Run:
    import deepspeed
    import deepspeed.comm as dist

    from ..data.loader import check_compatible
    from ..data.shards import open_prepared
    from ..model import build_model
    from ..tokenizer import load_tokenizer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    show_phase(f"reading the shards in {project.data.dir}")
    tokenizer = load_tokenizer(project.data.tokenizer, project.data.vocab_dir)
    data = open_prepared(project.data.dir)
    check_compatible(data, tokenizer.fingerprint, project.model.vocab_size)
    layout = batch_layout(project, world)
    seed = project.project.seed
    loader, val_loader = make_loaders(project, data, layout, rank, options.overfit_batch)
    seed_everything(seed)  # the same initial weights on every rank
    show_phase("building the model")
    model = build_model(project.model, device="cuda" if device == "cuda" else "cpu")
    model.activation_checkpointing = project.train.activation_checkpointing
    seed_everything(seed + 1000 * rank)  # then each rank its own dropout stream
    show_phase(deepspeed_phase(device))
    with library_output_to(Path(project.project.out_dir)):  # DeepSpeed's prints and logs → RUN/deepspeed.log
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        engine = initialize(project, model, layout, resolve_precision(project, device), device)
    if project.train.compile:
        show_phase("compiling the model (torch.compile; the first steps also wait for it)")
        engine.compile()
    run_dir = Path(project.project.out_dir)
    if options.overfit_batch:
        run_dir = run_dir / "overfit-batch"  # its metrics must not mix with the run's own
    run = Run(project=project, engine=engine, layout=layout, loader=loader, val_loader=val_loader,
              tokenizer=tokenizer, run_dir=run_dir, rank=rank, device=device,
              faults=Faults(os.environ.get("GPTCLI_FAULT", ""), rank))
    run.flops_per_token = model_flops_per_token(project.model, layout.seq_len)
    run.peak = peak_flops(device)
    if options.overfit_batch:
        run.fixed_batch = loader.next_batch()
        if rank == 0:
            truncate_metrics(run_dir, 0)
    else:
        resume_or_start(run, options.resume)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_resolved_config(run_dir, project)
        run.writer = MetricsWriter(run_dir, project.train.tensorboard)
    dist.barrier()
    return run


def make_loaders(project: Project, data, layout: BatchLayout, rank: int, overfit: bool):
    """The train loader (seeded order) and the val loader (file order), or None without val shards."""
    from ..data.loader import BatchLoader

    seed, world = project.project.seed, layout.world_size
    loader = BatchLoader(data, "train", layout.micro_batch_size, layout.seq_len, rank=rank, world_size=world,
                         seed=seed, shuffle=project.train.shuffle)
    if not project.train.eval_every or overfit:
        return loader, None
    if data.num_tokens("val") == 0:
        if rank == 0:
            print(f"note: {data.directory} has no val shards; evaluation is off.", file=sys.stderr)
        return loader, None
    return loader, BatchLoader(data, "val", layout.micro_batch_size, layout.seq_len, rank=rank, world_size=world,
                               seed=seed, shuffle=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_or_start(run: Run, mode: str) -> None:
    import deepspeed.comm as dist

    tag = checkpoint.find_resume(run.run_dir, mode)
    if tag is None:
        if run.rank == 0:
            checkpoint.remove_latest(run.run_dir)
            truncate_metrics(run.run_dir, 0)
        return
    show_phase(f"resuming from checkpoint {tag}")
    client = checkpoint.read_client_state(run.run_dir, tag)
    checkpoint.check_architecture(client, run.project.model, tag)
    checkpoint.load(run.engine, run.run_dir, tag)
    run.loader.load_state_dict(client["loader"])
    run.step, run.tokens = client["step"], client["tokens"]
    run.skipped_steps, run.elapsed = client.get("skipped_steps", 0), client.get("elapsed", 0.0)
    if client.get("config_hash") != checkpoint.config_hash(run.project) and run.rank == 0:
        print(f"note: the project differs from the one checkpoint {tag} was trained with "
              "(the architecture matches; other settings apply from here on).", file=sys.stderr)
    if run.rank == 0:
        truncate_metrics(run.run_dir, run.step)
        print(f"Resuming from {checkpoint.checkpoints_dir(run.run_dir) / tag} at step {run.step}.", file=sys.stderr)
    dist.barrier()


# --- the loop -----------------------------------------------------------------------------------------------------


def loop(run: Run, stop: StopRequest, options: TrainOptions) -> TrainResult:
    train = run.project.train
    lr_at = schedule_for(train)
    display = Display(run) if run.rank == 0 else None
    while not finished(run):
        started = time.perf_counter()
        lr = lr_at(run.step)
        loss, stop_signum = train_step(run, lr, stop)
        grad_norm = run.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        run.step += 1
        run.tokens += run.layout.tokens_per_step
        check_overflow(run, grad_norm)
        run.elapsed += time.perf_counter() - started
        record = step_record(run, loss, lr, grad_norm, time.perf_counter() - started)
        if should(train.eval_every, run) and run.val_loader is not None:
            record["eval_loss"] = evaluate(run)
            record["eval_perplexity"] = math.exp(min(record["eval_loss"], 700))
        if should(train.sample_every, run):
            print_sample(run)  # every rank enters: under ZeRO-3 they gather the weights together
        if run.writer is not None:
            run.writer.write(record)
        if display is not None:
            display.update(record)
        if not options.overfit_batch and (stop_signum or checkpoint_due(run)):
            save(run)
        if run.faults.has("kill", run.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if stop_signum:
            return finish(run, options, display, exit_code=128 + stop_signum)
    return finish(run, options, display)


def finished(run: Run) -> bool:
    train = run.project.train
    return run.step >= train.max_steps or (train.max_tokens > 0 and run.tokens >= train.max_tokens)


def should(every: int, run: Run) -> bool:
    return every > 0 and (run.step % every == 0 or finished(run))


def checkpoint_due(run: Run) -> bool:
    every = run.project.train.checkpoint_every
    return finished(run) or (every > 0 and run.step % every == 0)


def zero3(run: Run) -> bool:
    return run.project.deepspeed.zero_stage == 3


def train_step(run: Run, lr: float, stop: StopRequest) -> tuple[float, int]:
    """One optimizer step of micro batches; stops before the update if any rank's loss is not finite."""
    import deepspeed.comm as dist

    engine = run.engine
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    accum = run.layout.grad_accum_steps
    for micro in range(accum):
        inputs, targets = run.fixed_batch if run.fixed_batch is not None else run.loader.next_batch()
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        _, loss = engine(inputs, targets)
        if run.faults.has("nan", run.step + 1):
            loss = loss * float("nan")
        engine.backward(loss)
        loss_sum += loss.detach().float()
        if micro < accum - 1:
            engine.step()  # DeepSpeed counts micro steps; it updates only at the accumulation boundary
    if run.faults.has("sigterm", run.step + 1):
        os.kill(os.getpid(), signal.SIGTERM)
    # One collective and one host sync per step: the mean loss over ranks and whether anyone must stop.
    stats = torch.stack([loss_sum / accum, torch.tensor(float(stop.signum), device=device)])
    dist.all_reduce(stats)
    loss_value, signum_sum = stats.tolist()
    loss_value /= dist.get_world_size()
    if not math.isfinite(loss_value):
        raise diverged(run, run.step + 1, f"the loss is {loss_value}")
    engine.step()
    return loss_value, int(stop.signum or (signal.SIGTERM if signum_sum else 0))


def diverged(run: Run, step: int, what: str, before_step: bool = True) -> GptError:
    tag = checkpoint.read_latest(run.run_dir) if run.rank == 0 else None
    kept = f"; the last checkpoint ({tag}) is untouched" if tag else "; no checkpoint was written"
    when = "before the optimizer step" if before_step else "without saving"
    return GptError(f"Training stopped at step {step} {when}: {what}{kept}.", exit_code=DIVERGED_EXIT_CODE)


def check_overflow(run: Run, grad_norm: Optional[float]) -> None:
    """fp16: the loss scaler skipped an overflowing step; DeepSpeed counts them (and checkpoints the
    count). fp32/bf16: a non-finite gradient norm is fatal. ZeRO 1-3 have already refused that update;
    stage 0 has applied it, so the run stops and no later checkpoint can hold the damaged weights."""
    if run.engine.fp16_enabled():
        run.skipped_steps = int(run.engine.skipped_steps)
        return
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise diverged(run, run.step, f"the gradient norm is {grad_norm}", before_step=False)


def step_record(run: Run, loss: float, lr: float, grad_norm: Optional[float], seconds: float) -> dict:
    tokens_per_s = run.layout.tokens_per_step / seconds if seconds > 0 else None
    mfu = None
    if run.peak and tokens_per_s:
        mfu = run.flops_per_token * tokens_per_s / (run.peak * run.layout.world_size)
    return {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": run.tokens,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed": run.elapsed, "skipped_steps": run.skipped_steps}


def evaluate(run: Run) -> float:
    """Mean loss over the first eval_batches micro batches of the val split (the same ones every time)."""
    import deepspeed.comm as dist

    engine = run.engine
    engine.eval()
    total = torch.zeros(2, device=engine.device)  # (sum of batch losses, batches)
    with torch.no_grad():
        for inputs, targets in run.val_loader.sequential_batches(run.project.train.eval_batches):
            _, loss = engine(inputs.to(engine.device), targets.to(engine.device))
            total += torch.stack([loss.float(), torch.ones((), device=engine.device)])
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def print_sample(run: Run) -> None:
    """A sample from train.sample_prompt, seeded by the step so it does not disturb the training RNG."""
    module = sampling_model(run)  # every rank takes part under ZeRO-3; the others get None
    if module is None:
        return
    try:
        from ..generate import sample_text
    except ImportError:
        print("(sampling is unavailable: gptcli.generate is missing)", file=sys.stderr)
        return
    train = run.project.train
    was_training = module.training
    module.eval()
    with torch.random.fork_rng(devices=[module.wte.weight.device] if run.device == "cuda" else []), torch.no_grad():
        text = sample_text(module, run.tokenizer, train.sample_prompt, train.sample_tokens,
                           temperature=0.8, top_k=50, top_p=1.0, seed=run.project.project.seed + run.step)
    module.train(was_training)
    print(f"--- sample at step {run.step} ---\n{train.sample_prompt}{text}\n---", flush=True)


def sampling_model(run: Run):
    """Rank 0's model to sample from. Under ZeRO-3 the engine's module fetches its weights in collective
    hooks that rank 0 cannot run alone, so all ranks gather the weights and rank 0 copies them into a
    plain model; otherwise the engine's module itself."""
    if not zero3(run):
        return run.engine.module if run.rank == 0 else None
    import deepspeed

    from ..model import build_model

    module = run.engine.module
    names = [name for name, _ in module.named_parameters()]
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        if run.rank != 0:
            return None
        weights = {name: p.detach().clone() for name, p in zip(names, module.parameters())}
    plain = build_model(run.project.model, device=run.engine.device)
    plain.load_state_dict(weights, strict=False)  # the tied lm_head follows wte
    return plain


def save(run: Run) -> None:
    client = {"step": run.step, "tokens": run.tokens, "loader": run.loader.state_dict(),
              "config_hash": checkpoint.config_hash(run.project), "architecture": run.project.model.architecture_dict(),
              "world_size": run.layout.world_size, "skipped_steps": run.skipped_steps, "elapsed": run.elapsed,
              "model_fingerprint": run.project.model.fingerprint()}
    checkpoint.save(run.engine, run.run_dir, run.step, client, run.project.train.keep_checkpoints, run.faults)


def finish(run: Run, options: TrainOptions, display, exit_code: int = 0) -> TrainResult:
    import deepspeed.comm as dist

    result = TrainResult(run_dir=run.run_dir, step=run.step, exit_code=exit_code)
    if display is not None:
        display.close()
    if options.overfit_batch:
        show_overfit(run)
        return result
    dist.barrier()
    if run.rank == 0:
        tag = checkpoint.read_latest(run.run_dir)
        if exit_code == 0 and tag is not None:
            result.model_dir = checkpoint.consolidate(run.run_dir, tag, run.project.model, run.tokenizer)
        plot_losses(run.run_dir)
        where = f"; model in {result.model_dir}" if result.model_dir else ""
        reason = f" (stopped by signal {exit_code - 128})" if exit_code else ""
        print(f"Finished at step {run.step}{reason}: run dir {run.run_dir}{where}.", file=sys.stderr)
    dist.barrier()
    return result


def show_overfit(run: Run) -> None:
    """Print the first sequence of the fixed batch: input, target and the model's prediction per token."""
    if run.rank != 0:
        return
    inputs, targets = run.fixed_batch
    engine = run.engine
    engine.eval()
    with torch.no_grad():
        logits, loss = engine(inputs.to(engine.device), targets.to(engine.device))
    predicted = logits.argmax(-1)[0].tolist()
    decode = run.tokenizer.decode
    shown = min(len(predicted), 24)
    print(f"overfit batch: final loss {loss.item():.4f}; accuracy "
          f"{(logits.argmax(-1).cpu() == targets).float().mean().item():.3f}")
    print(f"{'pos':>4}  {'input':<16} {'target':<16} {'predicted':<16}")
    for i in range(shown):
        row = [repr(decode([t]))[1:-1][:15] for t in (inputs[0, i].item(), targets[0, i].item(), predicted[i])]
        print(f"{i:>4}  {row[0]:<16} {row[1]:<16} {row[2]:<16}")


class Display:
    """Rank 0's view: a live table on a terminal, otherwise one line every train.log_every steps."""

    def __init__(self, run: Run):
        from rich.console import Console

        self.run = run
        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            self.console = Console(stderr=True, width=200)  # one line per step in logs, not wrapped at 80
        self.live = None
        self.started = time.perf_counter()
        self.first_step = run.step
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, record: dict) -> None:
        run = self.run
        done = record["step"] - self.first_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        eta = format_eta(per_step * (run.project.train.max_steps - record["step"]))
        cells = {"step": f"{record['step']}/{run.project.train.max_steps}", "loss": f"{record['loss']:.4f}",
                 "lr": f"{record['lr']:.3e}", "grad norm": fmt(record["grad_norm"], ".3f"),
                 "tokens/s": fmt(record["tokens_per_s"], ",.0f"), "MFU": fmt(record["mfu"], ".1%"), "ETA": eta}
        if record.get("eval_loss") is not None:
            cells["val loss"] = f"{record['eval_loss']:.4f}"
        if self.live is not None:
            from rich.table import Table

            table = Table(*cells.keys(), title=f"gpt train: {run.run_dir}")
            table.add_row(*cells.values())
            self.live.update(table)
        elif record["step"] % max(run.project.train.log_every, 1) == 0 or "val loss" in cells:
            self.console.print("  ".join(f"{k} {v}" for k, v in cells.items()), highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def consolidate_only(project: Project) -> Path:
    """`gpt train --consolidate`: the latest checkpoint of the run dir → RUN/model, without training."""
    from ..tokenizer import load_tokenizer

    prepare_environment(device_type(project))
    run_dir = Path(project.project.out_dir)
    tag = checkpoint.read_latest(run_dir)
    if tag is None:
        raise GptError(f"{checkpoint.checkpoints_dir(run_dir)} has no complete checkpoint to consolidate.")
    client = checkpoint.read_client_state(run_dir, tag)
    checkpoint.check_architecture(client, project.model, tag)
    tokenizer = load_tokenizer(project.data.tokenizer, project.data.vocab_dir)
    return checkpoint.consolidate(run_dir, tag, project.model, tokenizer)
