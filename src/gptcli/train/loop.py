"""The training loop: optimizer steps, evaluation, samples, metrics and checkpoints, on every rank.

One optimizer step: the micro batches (forward, backward), one all-reduce that carries the mean loss and
the stop request, one host sync that reads it, then the optimizer step. So all ranks agree on the
numbers they log, on a non-finite loss (stop before the optimizer step) and on a SIGTERM/SIGINT (finish
the step, save, exit 128 + the signal number). The gradient norm of a step is known only after its
optimizer step; it is read at the next step's sync (or at once on steps that evaluate, sample or save),
so logging never adds a second sync to an ordinary step.

Helpers live beside this module: stopping.py (the stop request), faults.py (test faults), prefetch.py
(batches read ahead), display.py (the live view, the overfit printout), consolidation.py (RUN/model).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from ..batch import BatchLayout, batch_layout
from ..config import DEFAULT_RESUME, GenerateConfig, ModelConfig, Project, Resume
from ..errors import GptError
from ..objectives import NEXT_TOKEN, VAL_STREAM, Batch, Objective, keys_for, objective_spec
from ..optimizers import ADAMW, OptimizerSpec, optimizer_spec
from ..rundir import MODEL_DIR
from .engine import (
    compile_enabled,
    device_type,
    group_names,
    initialize,
    loop_clips_gradients,
    optimizer_note,
    precision_note,
    prepare_device,
    prepare_environment,
    resolve_precision,
    training_model_config,
)
from .faults import Faults, corrupt
from .launching.importing import import_deepspeed
from .launching.lock import RunDirClaim
from .launching.opbuild import prepare_cpu_comm_op
from .launching.stopping import StopRequest
from .observing import measure, probes, task_eval
from .observing.chatter import LibraryLog
from .observing.display import Display, show_overfit
from .observing.metrics import MetricsWriter, csv_columns, model_flops_per_token, peak_flops, truncate_metrics
from .observing.phases import deepspeed_phase, show_phase, training_starts
from .observing.trackers import start_trackers
from .prefetch import BatchPrefetcher, windows_of
from .preflight import preflight
from .schedule import schedule_for
from .state import checkpoint, reshard
from .state.consolidation import consolidate_only, hand_over
from .state.continuation import Start, prepare
from .state.warmstart import model_from_source, set_fp32_masters

if TYPE_CHECKING:
    import deepspeed

    from ..data.loader import BatchLoader
    from ..data.source import DataSource, Loader
    from ..model import GPT
    from ..tokenizer import Tokenizer

__all__ = ["TrainOptions", "TrainResult", "train", "consolidate_only"]

DIVERGED_EXIT_CODE = 4  # a non-finite loss or gradient norm stopped the run

# A gradient norm as DeepSpeed reports it: a device tensor (ZeRO 1-3), a float (bf16 ZeRO-0) or None.
GradNorm = Union[torch.Tensor, float, None]


@dataclass
class TrainOptions:
    resume: Resume = DEFAULT_RESUME
    restart: bool = False  # delete what gpt train wrote in the run dir, then start over
    overfit_batch: bool = False


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    exit_code: int = 0
    final_eval_loss: Optional[float] = None
    model_dir: Optional[Path] = None


@dataclass
class Run:
    """Everything the loop carries between steps."""

    project: Project
    model_config: ModelConfig  # the model trained: project.model, padded for a GPU (training_model_config)
    engine: "deepspeed.DeepSpeedEngine"
    layout: BatchLayout
    loader: BatchPrefetcher
    val_loaders: dict[str, "BatchLoader"]  # by source name ("" for one dir): what evaluation reads
    source: "DataSource"
    tokenizer: "Tokenizer"
    run_dir: Path
    rank: int
    device: str
    faults: Faults
    clips_gradients: bool  # fp32 ZeRO-0: the loop clips (engine.loop_clips_gradients)
    optimizer: OptimizerSpec  # train.optimizer's spec
    objective: Objective  # train.objective's: how windows become batches
    start: Start  # what the run continues from (continuation.prepare)
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    elapsed: float = 0.0
    slowest_step: float = 0.0  # seconds: the bound a step in progress gets after a stop request (stopping.py)
    clock: float = 0.0  # when the time of the next step started counting
    fixed_batch: Optional[Batch] = None
    writer: Optional[MetricsWriter] = None
    flops_per_token: int = 0
    peak: Optional[float] = None  # FLOP/s of one accelerator at the run's precision (the live MFU's denominator)
    tasks: Optional[task_eval.TaskSet] = None  # [eval] tasks: this rank's share of the examples
    precision: str = "fp32"
    speeds: list[float] = dataclasses.field(default_factory=list)  # tokens/s of each step logged (measure.py)


@dataclass
class StepDone:
    """An optimizer step whose gradient norm may still be on the device."""

    step: int
    loss: float
    lr: float
    seconds: float
    grad_norm: GradNorm
    source_tokens: dict  # a mixture's tokens taken from each source by the end of this step (source_tokens)


def train(project: Project, options: TrainOptions) -> TrainResult:
    """Train per the project on this rank; returns what happened (the exit code included)."""
    device = device_type(project)
    prepare_environment(device)
    # The libraries' prints and logs → RUN/deepspeed.log once the run dir is ours; from here on, as torch's
    # extension builder warns when pre-flight first imports it.
    library_log = LibraryLog()
    fresh = options.overfit_batch or options.restart
    resume = "never" if fresh else options.resume
    start = prepare(project, resume, int(os.environ["WORLD_SIZE"]))  # weights or checkpoint; [model], the batch
    # The checks, the plan and its estimate, before anything slow.
    checked = preflight(start.project, device, resume, overfit=options.overfit_batch, start=start)
    if checked.finished:  # nothing to train: pre-flight said how to train further
        run_dir = Path(project.project.out_dir)
        model_dir = run_dir / MODEL_DIR
        return TrainResult(run_dir=run_dir, step=checked.plan.steps_done,
                           model_dir=model_dir if model_dir.is_dir() else None)
    show_phase("loading DeepSpeed")
    with RunDirClaim() as claim:  # the run dir's lock, taken in setup(), is given back on every way out
        run = setup(start.project, options, device, claim, start, library_log)
        stop = StopRequest()
        stop.install()
        training_starts(run, stop)
        try:
            return loop(run, stop, options)
        finally:
            stop.restore()
            run.loader.close()
            if run.writer is not None:
                run.writer.close()


def setup(project: Project, options: TrainOptions, device: str, claim: RunDirClaim, start: Start,
          library_log: LibraryLog) -> Run:
    deepspeed = import_deepspeed()
    import deepspeed.comm as dist

    from ..data.source import open_source
    from ..tokenizer import load_tokenizer

    library_log.route_loggers()  # DeepSpeed set up its own stdout handler when it was imported
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    prepare_device(device)
    show_phase(f"reading the shards in {', '.join(project.data.directories)}")
    tokenizer = load_tokenizer(project.data.tokenizer, project.data.vocab_dir)
    source = open_source(project.data)
    source.check_tokenizer(tokenizer.fingerprint, project.model.vocab_size)
    layout = batch_layout(project.train, project.seq_len, world)
    seed = project.project.seed
    loader, val_loaders = make_loaders(project, source, layout, rank, options.overfit_batch)
    probes.watch_loader(loader, rank)
    model_config = training_model_config(project, device)
    seed_everything(seed)  # the same initial weights on every rank
    model, weights = build(model_config, start, device)
    model.activation_checkpointing = project.train.activation_checkpointing
    seed_everything(seed + 1000 * rank)  # then each rank its own dropout stream
    if device == "cpu":
        prepare_cpu_comm_op(show_phase)  # built where a kill cannot leave a lock that blocks the next run
    show_phase(deepspeed_phase(device))
    with library_log.capture():
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    precision = resolve_precision(project, device)
    optimizer = optimizer_spec(project.train.optimizer)
    notes = (precision_note(project, precision), optimizer_note(project, optimizer), sample_note(project, tokenizer))
    for note in notes:
        if note and rank == 0:
            print(note, file=sys.stderr)
    run_dir = Path(project.project.out_dir)
    if options.overfit_batch:
        run_dir = run_dir / "overfit-batch"  # its metrics must not mix with the run's own
    claim.take(run_dir, rank)  # one run per run dir, and a dir every rank sees, before anything is written
    tag = None if options.overfit_batch else checkpoint.agree_on_resume(run_dir, options.resume, options.restart, rank,
                                                                      source.directories)
    if tag != start.tag:  # prepare() read the run dir before the lock was ours
        raise GptError(f"The checkpoints in {checkpoint.checkpoints_dir(run_dir)} changed while gpt train started; "
                       "run it again.")
    library_log.settle(run_dir)
    universal = None
    if start.ranks_changed and project.deepspeed.zero_stage > 0:
        assert tag is not None and start.saved_ranks is not None, "ranks change only on a resume"
        reshard.check_reshardable(optimizer, tag, start.saved_ranks, world)
        show_phase(f"converting checkpoint {tag} for {world} ranks (DeepSpeed's universal checkpoint format)")
        with library_log.capture():
            universal = reshard.ensure_universal(run_dir, tag, rank)
    with library_log.capture():
        engine = initialize(project, model, layout, precision, device, load_universal=universal is not None)
    if weights is not None:
        set_fp32_masters(engine, weights)
    if tag is None:
        probes.dump_state(engine, optimizer, "initialized", 0, rank)
    if compile_enabled(project, device):
        show_phase("compiling the model (torch.compile; the first steps also wait for it)")
        engine.compile()
    run = Run(project=project, model_config=model_config, engine=engine, layout=layout,
              loader=BatchPrefetcher(loader, torch.device(engine.device)), val_loaders=val_loaders, source=source,
              tokenizer=tokenizer, run_dir=run_dir, rank=rank, device=device, faults=Faults.from_environment(rank),
              clips_gradients=loop_clips_gradients(project, precision), optimizer=optimizer,
              objective=objective_spec(project.train.objective), start=start)
    run.flops_per_token = model_flops_per_token(project.model, layout.seq_len)
    run.tasks = task_eval.prepare(project, tokenizer, model_config.block_size, rank, world, options.overfit_batch)
    run.peak = peak_flops(device, project.train.peak_tflops, precision)
    run.precision = precision
    if options.overfit_batch:
        run.fixed_batch = next_batch(run)
        if rank == 0:
            truncate_metrics(run_dir, 0)
    else:
        resume_or_start(run, tag, universal)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_resolved_config(run_dir, project)
        trackers = () if options.overfit_batch else start_trackers(project, run_dir, run.step, run.faults.tracker,
                                                                   show_phase)
        scored = run.tasks.definitions() if run.tasks is not None else []
        columns = csv_columns(scored, list(source.components()))
        run.writer = MetricsWriter(run_dir, trackers, columns)  # the trackers get what they lack
        if source.components() and not options.overfit_batch:
            write_mixture_history(run_dir, run.loader.state_dict()["history"])
    dist.barrier()
    return run


def build(config: ModelConfig, start: Start, device: str) -> tuple[GPT, Optional[dict]]:
    """The model at a random init, or holding init_from's weights (and those weights, for the masters)."""
    from ..model import build_model

    where = "cuda" if device == "cuda" else "cpu"
    if start.weights is None:
        show_phase("building the model")
        return build_model(config, device=where), None
    show_phase(f"reading the weights of {start.weights.name}")
    model, weights = model_from_source(start.weights, config)
    return model.to(where), weights


def make_loaders(project: Project, source: "DataSource", layout: BatchLayout, rank: int,
                 overfit: bool) -> tuple["Loader", dict[str, "BatchLoader"]]:
    """The data source's train loader (seeded order) and its val loaders (file order) by source name ("" for
    one dir; a mixture's sources each on their own), leaving out a source without a val split to evaluate on."""
    seed = project.project.seed
    loader = source.train_loader(layout, rank, seed, project.train.shuffle)
    if not project.train.eval_every or overfit:
        return loader, {}
    val_loaders = {}
    for name, part in source.evaluated_parts().items():
        if part.tokens("val") == 0:
            if rank == 0:
                off = f'data.sources "{name}" is not evaluated' if name else "evaluation is off"
                print(f"note: {part.description} has no val shards; {off}.", file=sys.stderr)
            continue
        val = part.val_loader(layout, rank, seed)  # pre-flight said when the val split is small
        if val is not None:
            val_loaders[name] = val
    return loader, val_loaders


def write_mixture_history(run_dir: Path, history: list[dict]) -> None:
    """RUN/mixture.json: the mixture of each segment of the run, from the step it started at."""
    from ..fsutil import atomic_write_json
    from ..rundir import MIXTURE_FILE

    atomic_write_json(run_dir / MIXTURE_FILE, {"segments": history})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_or_start(run: Run, tag: Optional[str], universal: Optional[Path] = None) -> None:
    """Continue from checkpoint `tag` (every rank got the same one from agree_on_resume; `universal`: its
    conversion for another number of ranks), or start at step 0."""
    import deepspeed.comm as dist

    if tag is None:
        if run.rank == 0:
            truncate_metrics(run.run_dir, 0)
        return
    show_phase(f"resuming from checkpoint {tag}")
    client = checkpoint.read_client_state(run.run_dir, tag)
    checkpoint.check_architecture(client, run.project.model, tag)
    check_optimizer(client, run.optimizer, tag, run.project.project.out_dir)
    checkpoint.load(run.engine, run.run_dir, tag, universal)
    if universal is not None:
        reshard.restore_optimizer_details(run.engine, universal, run.optimizer)
    saved_ranks = client.get("world_size", run.layout.world_size)
    if run.rank >= saved_ranks:  # a rank the checkpoint has no RNG states for
        seed_everything(reshard.new_rank_seed(run.project.project.seed, client["step"], run.rank))
    state, _ = run.source.resume_state(client["loader"], int(client["step"]), run.layout.seq_len)  # pre-flight noted it
    run.loader.load_state_dict(state)
    run.step, run.tokens = client["step"], client["tokens"]
    run.skipped_steps, run.elapsed = client.get("skipped_steps", 0), client.get("elapsed", 0.0)
    probes.dump_state(run.engine, run.optimizer, "loaded", run.step, run.rank)
    if client.get("config_hash") != run.start.config_hash and run.rank == 0:
        print(f"note: the project differs from the one checkpoint {tag} was trained with "
              "(the architecture matches; other settings apply from here on).", file=sys.stderr)
    if run.rank == 0:
        truncate_metrics(run.run_dir, run.step)
        world = run.layout.world_size
        ranks = f" on {world} ranks (saved on {saved_ranks})" if saved_ranks != world else ""
        print(f"Resuming from {checkpoint.checkpoints_dir(run.run_dir) / tag} at step {run.step}{ranks}.",
              file=sys.stderr)
    dist.barrier()


# --- the loop -----------------------------------------------------------------------------------------------------


def loop(run: Run, stop: StopRequest, options: TrainOptions) -> TrainResult:
    lr_at = schedule_for(run.project.train)
    scored = run.tasks.definitions() if run.tasks is not None else []
    display = Display(run.project, run.run_dir, run.step, scored) if run.rank == 0 else None
    pending: Optional[StepDone] = None
    run.clock = time.perf_counter()
    while not finished(run):
        lr = lr_at(run.step)
        loss, own_norm = micro_steps(run, lr)
        values = read_step(run, loss, stop, pending, own_norm)  # the step's one host sync
        seconds = time.perf_counter() - run.clock
        run.clock += seconds
        run.slowest_step = max(run.slowest_step, seconds)
        if pending is not None:
            log(run, pending, values["pending_norm"], display)
        if not math.isfinite(values["loss"]):
            raise diverged(run, run.step + 1, f"the loss is {values['loss']}", "before the optimizer step")
        if own_norm is not None and not math.isfinite(values["own_norm"]):
            raise diverged(run, run.step + 1, f"the gradient norm is {values['own_norm']}", "before the optimizer step")
        run.engine.step()
        run.step += 1
        run.tokens += run.layout.tokens_per_step
        run.elapsed += seconds
        norm = values["own_norm"] if own_norm is not None else run.engine.get_global_grad_norm()
        pending = StepDone(run.step, values["loss"], lr, seconds, norm, source_tokens(run))
        signum = values["signum"]
        if signum or boundary(run):
            log(run, pending, read_norm(pending.grad_norm), display, options)
            pending = None
            if not options.overfit_batch and (signum or checkpoint_due(run)):
                save(run)
            run.clock = time.perf_counter()  # evaluation, samples and saving are not training time
        run.faults.maybe_kill(run.step)
        if signum:
            return finish(run, options, display, exit_code=128 + signum)
    return finish(run, options, display)


def finished(run: Run) -> bool:
    train = run.project.train
    return run.step >= train.max_steps or (train.max_tokens > 0 and run.tokens >= train.max_tokens)


def should(every: int, run: Run) -> bool:
    return every > 0 and (run.step % every == 0 or finished(run))


def checkpoint_due(run: Run) -> bool:
    every = run.project.train.checkpoint_every
    return finished(run) or (every > 0 and run.step % every == 0)


def boundary(run: Run) -> bool:
    """A step after which the loop evaluates, samples, saves or ends: its record is completed at once."""
    train = run.project.train
    return (checkpoint_due(run) or should(train.eval_every, run) or should(train.sample_every, run)
            or (run.tasks is not None and should(run.tasks.every, run)))


def zero3(run: Run) -> bool:
    return run.project.deepspeed.zero_stage == 3


def micro_steps(run: Run, lr: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward and backward over the step's micro batches; returns this rank's mean loss (on the device)
    and, where the loop clips (fp32 ZeRO-0), the gradient norm before clipping."""
    engine = run.engine
    set_learning_rate(engine.optimizer, lr)
    loss_sum = torch.zeros((), device=engine.device)
    accum = run.layout.grad_accum_steps
    for micro in range(accum):
        batch = run.fixed_batch if run.fixed_batch is not None else next_batch(run)
        _, loss = engine(batch.inputs, batch.targets, return_logits=False, **batch.model_inputs())
        loss = corrupt(loss, run.faults, run.step + 1)
        engine.backward(loss)
        loss_sum += loss.detach().float()
        if micro < accum - 1:
            engine.step()  # DeepSpeed counts micro steps; it updates only at the accumulation boundary
    run.faults.maybe_sigterm(run.step + 1)
    run.faults.maybe_stall(run.step + 1)
    own_norm = None
    if run.clips_gradients:  # the last backward has all-reduced the gradients (ZeRO-0)
        clip = run.project.train.grad_clip or math.inf
        own_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip, foreach=False)
    return loss_sum / accum, own_norm


def next_batch(run: Run) -> Batch:
    """The next micro batch as the objective lays it out, drawn from (seed, each window's key)."""
    windows, keys = run.loader.next_windows()
    return run.objective.batch(windows, keys, run.project.project.seed, run.project.train.objective_options)


def set_learning_rate(optimizer, lr: float) -> None:
    """The schedule's rate into every parameter group, times the group's `lr_scale` where its optimizer spec
    gives one (optimizers.ParameterGroup; AdamW's groups have none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def read_step(run: Run, loss: torch.Tensor, stop: StopRequest, pending: Optional[StepDone],
              own_norm: Optional[torch.Tensor]) -> dict:
    """One all-reduce (the mean loss over ranks, whether any rank must stop) and one host read, which
    also fetches the previous step's gradient norm and the loop's own one."""
    import deepspeed.comm as dist

    stats = torch.stack([loss, torch.tensor(float(stop.signum), device=loss.device)])
    dist.all_reduce(stats)
    norms = [pending.grad_norm if pending is not None else None, own_norm]
    device_norms = [n.detach().reshape(()).double() for n in norms if isinstance(n, torch.Tensor)]
    values = torch.cat([stats.double(), torch.stack(device_norms)]) if device_norms else stats
    host = iter(values.tolist())
    loss_sum, signum_sum = next(host), next(host)
    read = [next(host) if isinstance(n, torch.Tensor) else n for n in norms]
    return {"loss": loss_sum / dist.get_world_size(), "pending_norm": read[0], "own_norm": read[1],
            "signum": int(stop.signum or (signal.SIGTERM if signum_sum else 0))}


def read_norm(grad_norm: GradNorm) -> Optional[float]:
    return float(grad_norm) if grad_norm is not None else None


def log(run: Run, done: StepDone, grad_norm: Optional[float], display: Optional[Display],
        options: Optional[TrainOptions] = None) -> None:
    """Complete a step's record (with `options`: the step is a boundary, so evaluate and sample first),
    stop on a non-finite gradient norm, write it and show it."""
    check_gradient_norm(run, done.step, grad_norm)
    record = step_record(run, done, grad_norm)
    train = run.project.train
    if options is not None and should(train.eval_every, run) and run.val_loaders:
        record.update(evaluate(run))
        record["eval_perplexity"] = math.exp(min(record["eval_loss"], 700))
    if options is not None and run.tasks is not None and should(run.tasks.every, run):
        record.update(task_eval.score(run.engine, run.tasks, zero3(run)))  # every rank scores its share
    if options is not None and should(train.sample_every, run):
        print_sample(run)  # every rank enters: under ZeRO-3 they gather the weights together
    if run.writer is not None:
        run.writer.write(record)
    if display is not None:
        display.update(record)


def diverged(run: Run, step: int, what: str, when: str) -> GptError:
    tag = checkpoint.read_latest(run.run_dir) if run.rank == 0 else None
    kept = f"; the last checkpoint ({tag}) is untouched" if tag else "; no checkpoint was written"
    return GptError(f"Training stopped at step {step} {when}: {what}{kept}.", exit_code=DIVERGED_EXIT_CODE)


def check_gradient_norm(run: Run, step: int, grad_norm: Optional[float]) -> None:
    """After DeepSpeed's optimizer step. fp16: the loss scaler skipped an overflowing step; DeepSpeed
    counts them (and checkpoints the count). fp32/bf16: a non-finite gradient norm is fatal; DeepSpeed
    refused that update (ZeRO 1-3, and bf16 ZeRO-0; fp32 ZeRO-0 never gets here, the loop stops it
    before the step), so the weights are still those of the step before, and the run stops unsaved."""
    if run.engine.fp16_enabled():
        run.skipped_steps = int(run.engine.skipped_steps)
        return
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise diverged(run, step, f"the gradient norm is {grad_norm}",
                       "after the optimizer step, which DeepSpeed skipped (the weights are the previous step's)")


def step_record(run: Run, done: StepDone, grad_norm: Optional[float]) -> dict:
    """The metrics line of step `done` (the loop has not started the next optimizer step yet, so the
    run's counters are still those of `done`)."""
    tokens_per_s = run.layout.tokens_per_step / done.seconds if done.seconds > 0 else None
    mfu = None
    if run.peak and tokens_per_s:
        mfu = run.flops_per_token * tokens_per_s / (run.peak * run.layout.world_size)
    if tokens_per_s:
        run.speeds.append(tokens_per_s)
    return {"step": done.step, "loss": done.loss, "lr": done.lr, "grad_norm": grad_norm, "tokens": run.tokens,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed": run.elapsed, "skipped_steps": run.skipped_steps,
            **measure.memory_record(run.device), **done.source_tokens}


def source_tokens(run: Run) -> dict[str, int]:
    """A mixture's tokens taken from each source so far ("tokens/books"), as its loader counts them after the
    last batch handed out (called when a step's micro batches are done); none for one dir."""
    if run.fixed_batch is not None:
        return {}
    taken = run.loader.state_dict().get("taken", {})
    return {f"tokens/{name}": windows * run.layout.seq_len for name, windows in taken.items()}


def evaluate(run: Run) -> dict[str, float]:
    """Mean loss over the first eval_batches micro batches of each val loader's split (the same ones every
    time), under the run's objective: "eval_loss" for one dir; for a mixture each source's ("eval_loss/books",
    with the tokens it scored, "eval_tokens/books") and their mean weighted by those tokens as "eval_loss".
    An objective's draws are keyed by (VAL_STREAM, rank, window of this rank's share), and for a mixture also
    by the source's row, so each evaluation scores the same batches."""
    import deepspeed.comm as dist

    engine = run.engine
    assert run.val_loaders, "a run evaluates only when it has a val split"
    device = torch.device(engine.device)
    engine.eval()
    names = list(run.val_loaders)
    totals = torch.zeros(len(names), 2, device=device)  # (sum of batch losses, batches) per source
    seed, options = run.project.project.seed, run.project.train.objective_options
    with torch.no_grad():
        for row, name in enumerate(names):
            rest = (run.rank,) if names == [""] else (run.rank, row)
            batches = run.val_loaders[name].sequential_batches(run.project.train.eval_batches)
            for number, (inputs, targets) in enumerate(batches):
                windows = windows_of(inputs, targets).to(device)  # (B, T+1)
                keys = keys_for(VAL_STREAM, number * len(windows), len(windows), *rest)
                batch = run.objective.batch(windows, keys, seed, options)
                _, loss = engine(batch.inputs, batch.targets, return_logits=False, **batch.model_inputs())
                totals[row] += torch.stack([loss.float(), torch.ones((), device=device)])
    engine.train()
    dist.all_reduce(totals)
    losses = (totals[:, 0] / totals[:, 1]).tolist()  # a batch's loss is the mean over its B × T tokens
    if names == [""]:
        return {"eval_loss": losses[0]}
    # Every rank reads the same number of batches of the same size: tokens = batches (all ranks) × B × T.
    tokens = [int(count) * run.val_loaders[name].batch * run.layout.seq_len
              for name, count in zip(names, totals[:, 1].tolist(), strict=True)]
    record: dict[str, float] = {"eval_loss": sum(loss * t for loss, t in zip(losses, tokens, strict=True)) / sum(tokens)}
    for name, loss, scored in zip(names, losses, tokens, strict=True):
        record[f"eval_loss/{name}"] = loss
        record[f"eval_tokens/{name}"] = scored
    return record


def sample_note(project: Project, tokenizer) -> Optional[str]:
    """Samples continue a prompt token by token: a run of another objective has none to print. A prompt that
    ends in a lone space token gets the note `gpt generate` gives it."""
    if not project.train.sample_every:
        return None
    if project.train.objective != NEXT_TOKEN.name:
        return (f"note: train.objective {project.train.objective} does not predict the next token, so this run "
                "prints no samples (train.sample_every).")
    from ..generate import lone_space_note

    note = lone_space_note(tokenizer, project.train.sample_prompt)
    return f"note: train.sample_prompt {note}" if note else None


def print_sample(run: Run) -> None:
    """A sample from train.sample_prompt, picked as [generate] says (sample_options). It runs under
    fork_rng, so the torch generators the training draws dropout from are as they were (a run with samples
    resumes exactly). Only next_token runs sample (sample_note)."""
    if run.objective.name != NEXT_TOKEN.name:
        return
    module = sampling_model(run)  # every rank takes part under ZeRO-3; the others get None
    if module is None:
        return
    from ..generate import sample_text

    prompt = run.project.train.sample_prompt
    with torch.random.fork_rng(devices=[module.wte.weight.device] if run.device == "cuda" else []), torch.no_grad():
        text = sample_text(module, run.tokenizer, prompt, sample_options(run.project, run.step))
    print(f"--- sample at step {run.step} ---\n{prompt}{text}\n---", flush=True)
    if run.writer is not None:
        run.writer.sample(run.step, prompt + text)


def sample_options(project: Project, step: int) -> GenerateConfig:
    """[generate] as `gpt generate` applies it (temperature, top_k, top_p, stop strings), for one sample of
    train.sample_tokens tokens seeded by the step, so a resumed run samples the same text."""
    return dataclasses.replace(project.generate, max_new_tokens=project.train.sample_tokens, num_samples=1,
                               seed=project.project.seed + step)


def sampling_model(run: Run) -> Optional[GPT]:
    """Rank 0's model to sample from. Under ZeRO-3 the engine's module fetches its weights in collective
    hooks that rank 0 cannot run alone, so all ranks gather the weights and rank 0 copies them into a
    plain model; otherwise the engine's module itself."""
    if not zero3(run):
        return run.engine.module if run.rank == 0 else None
    import deepspeed

    from ..model import model_from_state_dict

    module = run.engine.module
    names = [name for name, _ in module.named_parameters()]
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        if run.rank != 0:
            return None
        weights = {name: p.detach().clone() for name, p in zip(names, module.parameters(), strict=True)}
    return model_from_state_dict(run.model_config, weights, device=run.engine.device, dtype=torch.float32)  # the tied lm_head follows wte


def save(run: Run) -> None:
    client = {"step": run.step, "tokens": run.tokens, "loader": run.loader.state_dict(),
              "config_hash": run.start.config_hash, "architecture": run.project.model.architecture_dict(),
              "world_size": run.layout.world_size, "skipped_steps": run.skipped_steps, "elapsed": run.elapsed,
              "model_fingerprint": run.project.model.fingerprint(), "parameter_groups": parameter_group_names(run),
              "optimizer": run.optimizer.name,
              **run.start.client_state()}
    if run.writer is not None:
        run.writer.flush()  # what the trackers hold up to this step survives a kill after the checkpoint
    checkpoint.save(run.engine, run.run_dir, run.step, client, run.project.train.keep_checkpoints, run.faults)
    measure.record(run)  # the peaks so far and the speed, beside the checkpoint
    probes.dump_state(run.engine, run.optimizer, "saved", run.step, run.rank)
    if run.rank == 0 and run.start.ranks_changed and run.start.tag is not None:
        reshard.drop_conversion(run.run_dir, run.start.tag)  # this run's own checkpoint now stands in for it


def parameter_group_names(run: Run) -> list[list[str]]:
    """The parameter names of each optimizer group, in the optimizer's order: at ZeRO-0 DeepSpeed saves
    the fp16/bf16 optimizer's fp32 masters without names (consolidation.stage0_masters reads them)."""
    return group_names(run.engine.module, run.optimizer, run.project.train)


def check_optimizer(client: dict, spec: OptimizerSpec, tag: str, run_dir: str) -> None:
    """A checkpoint resumes only with the optimizer that saved its state; a checkpoint from before the
    record was made was AdamW's, the one optimizer there was."""
    saved = client.get("optimizer", ADAMW.name)
    if saved != spec.name:
        raise GptError(f'Cannot resume checkpoint {tag} with train.optimizer "{spec.name}": its optimizer state is '
                       f'"{saved}"\'s; resume with train.optimizer = "{saved}", or start a new run from its weights '
                       f'(train.init_from = "{run_dir}", a fresh "{spec.name}" state and schedule).')


def finish(run: Run, options: TrainOptions, display: Optional[Display], exit_code: int = 0) -> TrainResult:
    import deepspeed.comm as dist

    result = TrainResult(run_dir=run.run_dir, step=run.step, exit_code=exit_code)
    if display is not None:
        display.close()
    if options.overfit_batch:
        assert run.fixed_batch is not None, "--overfit-batch trains on the one batch it read first"
        show_overfit(run.engine, run.fixed_batch, run.tokenizer, run.rank)
        return result
    dist.barrier()
    if run.rank == 0:
        result.model_dir = hand_over(run.project, run.run_dir, run.tokenizer, run.step, exit_code)
        assert run.writer is not None, "rank 0 writes the metrics"
        run.writer.end(run.step, exit_code, result.model_dir)
    dist.barrier()
    return result
