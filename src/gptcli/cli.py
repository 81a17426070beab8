"""The `gpt` command line: each command parses its options, loads the project, calls one function of the
module that owns the work and shows the result. Nothing here does the work itself."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import GptError

app = typer.Typer(
    name="gpt",
    help="Pretrain GPT-1 and GPT-2 style language models from scratch, and use them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help texts name [sections] literally; Rich markup would eat them
)
out = Console()
err = Console(stderr=True)

ProjectOpt = Annotated[
    Optional[Path], typer.Option("--project", "-p", help="Project file (default: ./run.toml when present).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a project key: section.key=value (repeatable; beats the file)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]


def load(project: Optional[Path], overrides: Optional[list[str]]):
    from .config import load_project

    return load_project(project, overrides or [])


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


# --- gpt init -----------------------------------------------------------------------------------------------


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write run.toml.")] = Path("."),
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset for [model].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run.toml.")] = False,
) -> None:
    """Write a commented run.toml: every key, its default and one line of why."""
    from .config import commented_template
    from .fsutil import atomic_write_text
    from .presets import get_preset

    if preset is not None:
        get_preset(preset)
    target = directory / "run.toml"
    if target.exists() and not force:
        raise GptError(f"{target} already exists (use --force to overwrite it).")
    atomic_write_text(target, commented_template(preset))
    err.print(f"Wrote {target}")


# --- gpt inspect-params -----------------------------------------------------------------------------------


@app.command("inspect-params")
def inspect_params(
    preset: Annotated[Optional[str], typer.Argument(help="A preset name; default: the project's [model].")] = None,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option(min=1, help="Data-parallel GPUs for the ZeRO memory estimate.")] = 1,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Parameter counts per component against the reference, FLOPs per token, ZeRO memory per GPU."""
    from .config import project_from_dict
    from .inspect import inspect_parameters
    from .presets import PRESETS, get_preset

    if list_presets:
        return show_presets(PRESETS, as_json)
    if preset is not None:
        get_preset(preset)
        config = project_from_dict({"model": {"preset": preset}}).model
    else:
        config = load(project, overrides).model
    report = inspect_parameters(config, gpus=gpus)
    if as_json:
        return emit_json(report.to_json())
    show_parameter_report(report)


def show_presets(presets, as_json: bool) -> None:
    if as_json:
        return emit_json({name: {"reference": p.reference, "description": p.description, "source": p.source}
                          for name, p in presets.items()})
    table = Table(title="Presets")
    for column in ("name", "reference count", "what"):
        table.add_column(column)
    for name, p in presets.items():
        table.add_row(name, f"{p.reference:,}" if p.reference else "—", p.description)
    out.print(table)


def show_parameter_report(report) -> None:
    table = Table(title=f"{report.name}: parameters")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("per block", justify="right")
    table.add_column("share", justify="right")
    for name, count in report.components.items():
        per_block = f"{count // report.n_layer:,}" if "all blocks" in name else ""
        table.add_row(name, f"{count:,}", per_block, f"{100 * count / report.total:.1f}%")
    table.add_section()
    table.add_row("total", f"{report.total:,}", "", "100%")
    if report.reference is not None:
        mark = "[green]✓[/green]" if report.matches else "[red]✗[/red]"
        table.add_row("reference", f"{report.reference:,}", "", mark)
    out.print(table)
    if report.source:
        out.print(f"reference: {report.source}")
    out.print(f"FLOPs per token (training, T={report.seq_len}): {report.flops_per_token:,} "
              f"= 6·N + 12·L·H·Q·T with N = {report.flops_parameters:,} (all parameters but wpe)")
    memory = Table(title=f"model-state memory per GPU, mixed-precision AdamW, {report.gpus} GPU(s)")
    for stage in report.memory_per_gpu:
        memory.add_column(stage.replace("zero", "ZeRO-"), justify="right")
    memory.add_row(*(f"{b / 2**30:.2f} GiB" for b in report.memory_per_gpu.values()))
    out.print(memory)


# --- gpt prepare ----------------------------------------------------------------------------------------------


@app.command("prepare")
def prepare_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Text files, directories, globs, .jsonl (.gz too), a saved `datasets` dir, or hf:NAME[/CONFIG].",
        show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output dir (default: [data] dir).")] = None,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        min=0.0, max=0.999999, help="Fraction of documents held out for val (default: [data] val_fraction).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=0, help="Tokenizer processes; 0 = one per core (default: [data] workers).")] = None,
    text_column: Annotated[Optional[str], typer.Option(
        help="Field with the text in .jsonl records and datasets (default: [data] text_column).")] = None,
    separator: Annotated[Optional[str], typer.Option(
        help="Documents inside a text file: none (one per file), blank-line or line (default: [data] separator).")
    ] = None,
    shard_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="Tokens per shard file (default: [data] shard_tokens).")] = None,
    vocab_dir: Annotated[Optional[str], typer.Option(
        help="Local vocabulary: dir with encoder.json+vocab.bpe or vocab.json+merges.txt, or a .tiktoken file.")
    ] = None,
    replace_invalid_utf8: Annotated[bool, typer.Option(
        "--replace-invalid-utf8", help="Read invalid UTF-8 bytes as U+FFFD and count them (default: refuse).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing prepared dir.")] = False,
    verify: Annotated[Optional[Path], typer.Option(
        "--verify", help="Check a prepared dir (headers, sizes, checksums, token ids) instead of preparing.",
        show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize a corpus into verified token shards: parallel, constant memory, never half-written."""
    from .data import prepare as preparing

    if verify is not None:
        if inputs:
            raise typer.BadParameter("give either INPUT... or --verify DIR, not both.")
        report = preparing.verify_prepared(verify)
        return emit_json(report) if as_json else show_verify_report(report)
    settings = {"val_fraction": val_fraction, "workers": workers, "text_column": text_column,
                "separator": separator, "shard_tokens": shard_tokens, "vocab_dir": vocab_dir}
    extra = [f"data.{key}={json.dumps(value)}" for key, value in settings.items() if value is not None]
    config = load(project, (overrides or []) + extra)
    options = preparing.PrepareOptions(
        inputs=list(inputs or []), out=out_dir or Path(config.data.dir), tokenizer=config.data.tokenizer,
        vocab_dir=config.data.vocab_dir, separator=config.data.separator, text_column=config.data.text_column,
        val_fraction=config.data.val_fraction, seed=config.project.seed, shard_tokens=config.data.shard_tokens,
        workers=config.data.workers, force=force, replace_invalid_utf8=replace_invalid_utf8)
    with prepare_progress() as on_progress:
        summary = preparing.prepare(options, on_progress)
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if as_json:
        return emit_json(summary.to_json())
    show_prepare_summary(summary)


class prepare_progress:
    """A progress bar on stderr (bytes, documents, tokens/s, ETA); a callback for the work to call."""

    def __enter__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.started = None
        self.bar = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(),
                            TextColumn("{task.fields[documents]:,} docs · {task.fields[rate]} tokens/s"),
                            TimeRemainingColumn(), console=err, transient=True)
        self.task = self.bar.add_task("prepare", total=None, documents=0, rate="—")
        return self.update

    def update(self, progress) -> None:
        import time

        if self.started is None:  # the bar's thread starts only once the work's worker processes exist
            self.bar.start()
        now = time.perf_counter()
        self.started = self.started or now
        rate = progress.tokens / (now - self.started) if now > self.started else 0.0
        self.bar.update(self.task, completed=progress.disk_bytes, total=progress.total_bytes or None,
                        documents=progress.documents, rate=f"{rate:,.0f}")

    def __exit__(self, *exc):
        if self.started is not None:
            self.bar.stop()


def show_prepare_summary(summary) -> None:
    table = Table(title=f"prepared {summary.out}")
    for column in ("", "train", "val", "total"):
        table.add_column(column, justify="right")
    for name, values in (("documents", summary.documents), ("tokens", summary.tokens), ("shards", summary.shards)):
        table.add_row(name, f"{values['train']:,}", f"{values['val']:,}", f"{sum(values.values()):,}")
    out.print(table)
    out.print(f"{summary.bytes:,} bytes of text, {summary.tokens_per_byte:.3f} tokens per byte, "
              f"{summary.seconds:.1f} s with {summary.workers} worker(s) "
              f"({sum(summary.tokens.values()) / max(summary.seconds, 1e-9):,.0f} tokens/s)")


def show_verify_report(report) -> None:
    tokens = report["tokens"]
    out.print(f"[green]✓[/green] {report['dir']}: {report['shards']} shards verified (headers, sizes, sha256, "
              f"token ids); {tokens['train']:,} train + {tokens['val']:,} val tokens, tokenizer {report['tokenizer']}")


# --- gpt train / gpt plot ----------------------------------------------------------------------------------


@app.command("train")
def train_command(
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Ranks on this machine (GPUs; CPU processes without CUDA).")] = 1,
    hostfile: Annotated[Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile: train on several machines.")] = None,
    resume: Annotated[str, typer.Option("--resume", help="auto: continue from the latest checkpoint if any; required: fail without one; never: start fresh, refused where a run exists.")] = "auto",
    restart: Annotated[bool, typer.Option("--restart", help="Delete what gpt train wrote in the run dir (checkpoints, metrics, model/), then start over.")] = False,
    overfit_batch: Annotated[bool, typer.Option("--overfit-batch", help="Train on one batch over and over (sanity check: loss → ~0).")] = False,
    consolidate: Annotated[bool, typer.Option("--consolidate", help="Only write RUN/model from the latest checkpoint, then exit.")] = False,
) -> None:
    """Pretrain with DeepSpeed ZeRO: checkpoints, exact resume, metrics, a consolidated model at the end.

    Exit codes: 0 done; 1 a user error; 4 a non-finite loss or gradient norm stopped the run before the
    optimizer step; 128 + N stopped by signal N after saving (143 SIGTERM, 130 SIGINT)."""
    from .train.loop import TrainOptions, consolidate_only, train

    if resume not in ("auto", "required", "never"):
        raise typer.BadParameter('must be "auto", "required" or "never".', param_hint="--resume")
    config = load(project, overrides)
    if consolidate:
        err.print(f"Wrote {consolidate_only(config)}")
        return
    if (nproc > 1 or hostfile is not None) and "RANK" not in os.environ:
        from .train.engine import launch

        argv = [*(["--project", str(project)] if project else []), *[f"--set={o}" for o in overrides or []],
                "--resume", resume, *(["--overfit-batch"] if overfit_batch else []), *(["--restart"] if restart else [])]
        raise typer.Exit(launch(argv, nproc, str(hostfile) if hostfile else None))
    result = train(config, TrainOptions(resume=resume, overfit_batch=overfit_batch, restart=restart))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("plot")
def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (holds metrics.jsonl).")],
    output: Annotated[Optional[Path], typer.Option("--out", help="PNG to write (default RUN_DIR/loss.png).")] = None,
) -> None:
    """Draw the loss curve of a run, finished or in progress, into a PNG."""
    from .train.metrics import plot_losses

    err.print(f"Wrote {plot_losses(run_dir, output)}")


# --- gpt generate / gpt eval -------------------------------------------------------------------------------

CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Model dir or run dir (default: the project's out_dir, i.e. RUN/model)."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
Bf16Opt = Annotated[bool, typer.Option("--bf16", help="bf16 autocast (fast on GPU; fp32 is the default).")]


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise typer.BadParameter(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)", param_hint="--device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptError(f"--device {name} asks for CUDA, but no CUDA device is available here.")
    return device


def load_model_for(checkpoint: Optional[Path], config, device):
    """--checkpoint, else the project's run dir (whose consolidated model is RUN/model)."""
    from .modeldir import load_model_dir

    if checkpoint is None:
        run_dir = Path(config.project.out_dir)
        if not run_dir.exists():
            raise GptError(f"No --checkpoint given and the project's run dir {run_dir} does not exist; pass "
                           "--checkpoint MODEL_DIR (a model dir or a run dir) or train the project first.")
        checkpoint = run_dir
    return load_model_dir(checkpoint, device=device)


def read_prompts(prompts: Optional[list[str]], default: str) -> list[str]:
    """The prompts as given ("-" = stdin); the [generate] prompt when none is given."""
    prompts = prompts or [default]
    if prompts.count("-") > 1:
        raise typer.BadParameter("stdin can be read once; give '-' at most once", param_hint="PROMPT")
    texts = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in prompts]
    for index, text in enumerate(texts):
        if not text.strip():
            where = "from stdin" if prompts[index] == "-" else f"number {index + 1}"
            raise GptError(f"The prompt {where} is empty; give some text to continue.")
    return texts


@app.command("generate")
def generate_command(
    prompts: Annotated[Optional[list[str]], typer.Argument(
        help="Text to continue; several prompts run as one batch; '-' reads stdin. Default: [generate] prompt.",
        show_default=False)] = None,
    project: ProjectOpt = None,
    checkpoint: CheckpointOpt = None,
    overrides: SetOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Tokens to generate per sample.")] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0.0, help="Softmax temperature; 0 = greedy.")] = None,
    top_k: Annotated[Optional[int], typer.Option(min=0, help="Keep the k most likely tokens; 0 = all.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass in (0, 1]; 1 = off.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(
        "--num-samples", "-n", min=1, help="Samples per prompt.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Sampling seed (default: [generate] seed, else project.seed).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop a sample at this string (repeatable).")] = None,
    lookahead: Annotated[Optional[int], typer.Option(
        min=0, help="Greedy, one sample: verify this many prompt-lookup draft tokens per pass (same output).")] = None,
    device: DeviceOpt = "auto",
    bf16: Bf16Opt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue prompts with a trained model: top-k / top-p / temperature sampling or greedy, with a KV cache."""
    from contextlib import nullcontext

    import torch

    from .generate import SamplingOptions, generate

    config = load(project, overrides)
    defaults = config.generate
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise typer.BadParameter(f"{top_p} is not in (0, 1]", param_hint="--top-p")
    texts = read_prompts(prompts, defaults.prompt)
    options = SamplingOptions(
        max_new_tokens=max_new_tokens or defaults.max_new_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else top_k, top_p=defaults.top_p if top_p is None else top_p,
        num_samples=num_samples or defaults.num_samples,
        seed=seed if seed is not None else (defaults.seed if defaults.seed is not None else config.project.seed),
        stop=tuple(stop if stop is not None else defaults.stop),
        lookahead=defaults.lookahead if lookahead is None else lookahead)
    target = resolve_device(device)
    loaded = load_model_for(checkpoint, config, target)
    stream = not as_json and len(texts) == 1 and options.num_samples == 1

    def write(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    autocast = torch.autocast(target.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        samples = generate(loaded.model, loaded.tokenizer, texts, options, on_text=write if stream else None,
                           on_notice=lambda message: err.print(f"note: {message}", highlight=False))
    if as_json:
        return emit_json({"samples": [s.to_json() for s in samples]})
    if stream:
        sys.stdout.write("\n")
        return
    for number, sample in enumerate(samples):
        out.rule(f"prompt {sample.prompt_index + 1}, sample {number % options.num_samples + 1}", style="dim")
        out.print(sample.prompt + sample.text, markup=False, highlight=False, soft_wrap=True)


@app.command("eval")
def eval_command(
    project: ProjectOpt = None,
    checkpoint: CheckpointOpt = None,
    overrides: SetOpt = None,
    text: Annotated[Optional[Path], typer.Option(help="Score this UTF-8 text file instead of the shards.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Score a Hugging Face dataset: NAME or NAME:CONFIG on the Hub, or a save_to_disk dir.")] = None,
    dataset_split: Annotated[str, typer.Option(help="Split of --dataset.")] = "test",
    split: Annotated[Optional[str], typer.Option(
        help="Shards to score: val or train (default: [eval] split).")] = None,
    stride: Annotated[Optional[int], typer.Option(
        help="Sliding-window stride in tokens; 0 = the full context.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per forward pass.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=0, help="Score at most this many tokens; 0 = all.")] = None,
    device: DeviceOpt = "auto",
    bf16: Bf16Opt = False,
    as_json: JsonOpt = False,
) -> None:
    """Loss, perplexity and bits per byte of a model on the project's val shards or a text file."""
    from .evaluate import (
        dataset_tokens,
        evaluate_sequences,
        resolve_stride,
        scored_count,
        shard_sequences,
        text_tokens,
    )

    config = load(project, overrides)
    settings = config.eval
    if split is not None and split not in ("val", "train"):
        raise typer.BadParameter(f"{split!r} is not val or train", param_hint="--split")
    if text is not None and dataset is not None:
        raise typer.BadParameter("give --text or --dataset, not both", param_hint="--dataset")
    text = text if text is not None or dataset is not None else (Path(settings.text) if settings.text else None)
    stride = settings.stride if stride is None else stride
    max_tokens = settings.max_tokens if max_tokens is None else max_tokens
    target = resolve_device(device)
    loaded = load_model_for(checkpoint, config, target)
    context = loaded.config.block_size
    stride = resolve_stride(stride, context)
    if dataset is not None:
        tokens = dataset_tokens(dataset, dataset_split, config.data.text_column, loaded.tokenizer, max_tokens)
        sequences, source = [tokens], f"{dataset} ({dataset_split})"
    elif text is not None:
        sequences, source = [text_tokens(text, loaded.tokenizer, max_tokens)], str(text)
    else:
        split = split or settings.split
        sequences = shard_sequences(config.data.dir, split, loaded.tokenizer, max_tokens)
        source = f"{config.data.dir} ({split})"
    total = scored_count((len(s) for s in sequences), context, stride)
    with eval_progress(total, quiet=False) as advance:
        result = evaluate_sequences(loaded.model, loaded.tokenizer, sequences, source=source, stride=stride,
                                    batch_size=batch_size or settings.batch_size, bf16=bf16, progress=advance)
    if as_json:
        return emit_json(result.to_json())
    show_eval_result(result)


def eval_progress(total: int, quiet: bool):
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextmanager
    def bar():
        columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True, disable=quiet) as progress:
            task = progress.add_task("eval", total=total)
            yield lambda done: progress.advance(task, done)

    return bar()


def show_eval_result(result) -> None:
    table = Table(title=f"eval: {result.source}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("bits per byte", f"{result.bits_per_byte:.4f}")
    table.add_row("scored tokens", f"{result.tokens:,}")
    table.add_row("bytes", f"{result.bytes:,}")
    table.add_row("windows (context, stride)", f"{result.windows:,} ({result.context}, {result.stride})")
    table.add_row("perplexity, transformers guide weighting", f"{result.hf_perplexity:.3f}")
    table.add_row("tokens/s", f"{result.tokens / result.seconds:,.0f}" if result.seconds else "—")
    out.print(table)


# --- gpt load-hf / gpt export-hf --------------------------------------------------------------------------


@app.command("load-hf")
def load_hf_command(
    source: Annotated[str, typer.Argument(help="A Hugging Face model dir, a weights file with config.json beside it, or a hub id such as gpt2-medium.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model dir to write.")],
    verify: Annotated[bool, typer.Option("--verify", help="Also compare logits with transformers on real text; fail above 1e-4.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model dir at --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert GPT-2 (any size, distilgpt2) or GPT-1 weights from Hugging Face into a gptcli model dir."""
    from .hf import load_hf

    report = load_hf(source, out_dir, verify=verify, force=force)
    if as_json:
        return emit_json(report.to_json())
    reference = ""
    if report.reference is not None:
        mark = "[green]✓[/green]" if report.matches else "[red]✗[/red]"
        reference = f" (reference {report.reference:,} for {report.preset} {mark})"
    out.print(f"{report.family} from {report.source}: {report.parameters:,} parameters{reference}, {report.dtype}")
    out.print(f"tokenizer: {report.tokenizer_note}", highlight=False)
    if report.max_abs_diff is not None:
        out.print(f"verify: max |logit difference| vs transformers = {report.max_abs_diff:.3g} "
                  f"(tolerance {report.to_json()['tolerance']:g}) [green]✓[/green]")
    out.print(f"Wrote {report.out}")


@app.command("export-hf")
def export_hf_command(
    checkpoint: Annotated[Path, typer.Argument(help="A gptcli model dir, or a run dir (its consolidated model).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Hugging Face dir to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing dir at --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a model as a Hugging Face dir (config.json, model.safetensors, tokenizer files) for from_pretrained."""
    from .hf import export_hf

    report = export_hf(checkpoint, out_dir, force=force)
    if as_json:
        return emit_json(report.to_json())
    out.print(f"Wrote {report.out} ({report.family}, {report.tensors} tensors): {', '.join(report.files)}")


# --- entry point ----------------------------------------------------------------------------------------------


def main() -> None:
    """Run the app; user errors become one sentence on stderr and a non-zero exit."""
    try:
        app()
    except GptError as error:
        err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as error:  # a bug: say so in one line; the traceback on request
        if os.environ.get("GPTCLI_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/bold red] {type(error).__name__}: {escape(str(error))} "
                  "(set GPTCLI_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
