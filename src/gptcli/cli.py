"""The `gpt` command line: each command parses its options, loads the project, calls one function of the
module that owns the work and shows the result. Nothing here does the work itself.

Options that stand for project keys (`--top-p`, `--stride`, ...) become `--set` overrides, so the schema in
config.py validates them like any other value, and their help is the key's documentation."""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import DEFAULT_RESUME, Resume, field_doc, field_range, option_overrides
from .errors import GptError, UsageError
from .planner import gpu_names
from .registry import TASKS


def quiet_flags(params: list) -> list:
    """Help without a `<bool>` type beside flags (--json, --force, --help): a flag takes no value."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return quiet_flags(super().get_params(ctx))

    def parse_args(self, ctx, args):
        """An unknown option that names a project key (`gpt train --max-steps 10`) says how to set that key,
        instead of click's nearest option (--master-port)."""
        from typer._click.exceptions import NoSuchOption

        try:
            return super().parse_args(ctx, list(args))
        except NoSuchOption as error:
            takes_set = any("--set" in getattr(param, "opts", ()) for param in self.params)
            hint = project_key_hint(error.option_name, list(args), takes_set)
            if hint:
                error.message, error.possibilities = f"No such option: {error.option_name}; {hint}", None
            raise


class Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return quiet_flags(super().get_params(ctx))


class App(typer.Typer):
    """Every command gets the quiet-flag help, whoever registers it."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


app = App(
    name="gpt",
    help="Pretrain GPT-1 and GPT-2 style language models from scratch, and use them.",
    cls=Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help texts name [sections] literally; Rich markup would eat them
    context_settings={"help_option_names": ["-h", "--help"]},
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


def project_key_hint(option: str, args: list[str], takes_set: bool) -> Optional[str]:
    """How to set the project key an unknown `--option` names (`--max-steps` → train.max_steps), with the value
    the command line gave it; None when it names no key."""
    from dataclasses import fields

    from .config import section_class, section_names

    key = option.lstrip("-").replace("-", "_")
    keys = [f"{section}.{key}" for section in section_names()
            if key in {field.name for field in fields(section_class(section))}]
    if not keys:
        return None
    value = "VALUE"
    for index, arg in enumerate(args):
        if arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        elif arg == option and index + 1 < len(args) and not args[index + 1].startswith("--"):
            value = args[index + 1]
    if not takes_set:
        return f"{' or '.join(keys)} is a project key: set it in the project file."
    return f"{' or '.join(keys)} is a project key: {' or '.join(f'--set {k}={value}' for k in keys)}"


def key_help(section: str, key: str) -> str:
    """An option that stands for a project key is documented by that key: its doc line and its range (the
    schema checks the value when the project loads, as for `--set`)."""
    bounds = field_range(section, key)
    return f"{field_doc(section, key)} ({f'{bounds}; ' if bounds else ''}default: [{section}] {key})"


def key_option(section: str, key: str, *names: str) -> Any:
    """The typer.Option of an option standing for `section.key`, the metadata of an alias
    `Annotated[Optional[T], key_option(...)]` (T the key's type): not given = the project's value. No bounds of
    its own: the value becomes an override of the key, so the schema's range applies."""
    return typer.Option(*names, help=key_help(section, key), show_default=False)


def load(project: Optional[Path], overrides: Optional[list[str]]):
    from .config import load_project

    return load_project(project, overrides or [])


def emit_json(obj) -> None:
    """One JSON object; a non-finite number (a NaN loss) is null, as JSON has no NaN or Infinity."""
    sys.stdout.write(json.dumps(finite_or_null(obj), allow_nan=False) + "\n")


def finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def show_version(value: bool) -> None:
    if value:
        out.print(f"gptcli {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=show_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Pretrain GPT-1 and GPT-2 style language models from scratch, and use them."""


# --- gpt init -----------------------------------------------------------------------------------------------


InitDirArg = Annotated[Path, typer.Argument(help="Where to write run.toml.")]
InitPresetOpt = Annotated[Optional[str], typer.Option(
    help="Architecture preset for [model] (see inspect-params --list).")]
InitForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing run.toml.")]


@app.command()
def init(
    directory: InitDirArg = Path("."),
    preset: InitPresetOpt = None,
    force: InitForceOpt = False,
) -> None:
    """Write a commented run.toml: every key, its value and one line of why; the keys a preset decides
    are comments, so changing `preset` takes effect."""
    from .config import write_template

    err.print(escape(f"Wrote {write_template(directory, preset, force)}"), highlight=False, soft_wrap=True)


# --- gpt inspect-params -----------------------------------------------------------------------------------


InspectPresetArg = Annotated[Optional[str], typer.Argument(
    help="A preset name (--set may change it); default: the project's [model], or every preset without a project.")]
GpusOpt = Annotated[int, typer.Option(min=1, help="Data-parallel GPUs for the ZeRO memory estimate and the plan.")]
GpuOpt = Annotated[Optional[str], typer.Option(
    "--gpu", help=f"Plan for this GPU (its memory and bf16 peak): {', '.join(gpu_names())}.", show_default=False)]
GpuMemoryOpt = Annotated[Optional[str], typer.Option(
    "--gpu-memory", help="Memory of one GPU, e.g. 80GiB or 24GB (instead of, or over, --gpu's).", show_default=False)]
MicroBatchOpt = Annotated[Optional[str], typer.Option(
    "--micro-batch", help='Plan at this micro batch, or "auto": the largest that fits (default: [train] '
    "micro_batch_size).", show_default=False)]
MfuOpt = Annotated[Optional[float], typer.Option(
    "--mfu", help="Model FLOPs utilisation for the time estimate (default: the speed the project's last run "
    "measured, else by GPU generation and model size from published runs; see docs/planning.md).",
    show_default=False)]
PlanPrecisionOpt = Annotated[Optional[str], key_option("train", "precision", "--precision")]
ListPresetsOpt = Annotated[bool, typer.Option("--list", help="List the presets and exit.")]


@app.command("inspect-params")
def inspect_params(
    preset: InspectPresetArg = None,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    gpus: GpusOpt = 1,
    gpu: GpuOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    micro_batch: MicroBatchOpt = None,
    mfu: MfuOpt = None,
    precision: PlanPrecisionOpt = None,
    list_presets: ListPresetsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Parameter counts per component against the reference, FLOPs per token, ZeRO memory per GPU, and the
    plan of the run (memory by term, what fits, the time) beside what the project's last run measured."""
    if list_presets:
        from .presets import PRESETS

        return show_presets(PRESETS, as_json)
    from .inspect import PlanRequest, PresetComparison, inspect_command

    request = PlanRequest(gpu=gpu, gpu_memory=gpu_memory, micro_batch=micro_batch, mfu=mfu, precision=precision)
    result = inspect_command(preset, project, overrides or [], gpus=gpus, request=request)
    if as_json:
        return emit_json(result.to_json())
    if isinstance(result, PresetComparison):
        return show_preset_comparison(result)
    show_parameter_report(result)
    show_plan(result.plan, result.against)


def show_presets(presets, as_json: bool) -> None:
    if as_json:
        return emit_json({name: {"reference": p.reference, "description": p.description, "source": p.source,
                                 "model": p.model, "train": p.train} for name, p in presets.items()})
    table = Table(title="Presets")
    for column in ("name", "published count", "what", "training defaults"):
        table.add_column(column)
    for name, p in presets.items():
        training = ", ".join(f"{key} {value}" for key, value in p.train.items()) or escape("the [train] defaults")
        table.add_row(name, f"{p.reference:,}" if p.reference else "—", p.description, training)
    out.print(table)


def show_preset_comparison(comparison) -> None:
    table = Table(title="Presets: computed parameter count against the published one")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("preset", "left"), ("computed", "right"), ("published", "right"), ("", "center"), ("source", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for report in comparison.reports:
        mark = "—" if report.matches is None else "[green]✓[/green]" if report.matches else "[red]✗[/red]"
        published = f"{report.reference:,}" if report.reference is not None else "none"
        table.add_row(report.name, f"{report.total:,}", published, mark, report.source or "")
    out.print(table)
    out.print("One preset in detail: gpt inspect-params NAME; your project's model: gpt inspect-params --project FILE")


def show_parameter_report(report) -> None:
    from .planner import model_state_title

    title = f"custom (customised from {report.customised_from})" if report.customised_from else report.name
    table = Table(title=f"{title}: parameters")
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
    elif report.customised_from:
        out.print(f"reference: customised: no published count (preset {report.customised_from} with other "
                  "[model] keys)")
    out.print(f"FLOPs per token (training, T={report.seq_len}): {report.flops_per_token:,} "
              f"= 6·N + 12·L·H·Q·T with N = {report.flops_parameters:,} (all parameters but wpe)")
    memory = Table(title=model_state_title(report.gpus))
    for stage in report.memory_per_gpu:
        memory.add_column(stage.replace("zero", "ZeRO-"), justify="right")
    memory.add_row(*(f"{b / 2**30:.2f} GiB" for b in report.memory_per_gpu.values()))
    out.print(memory)


def show_plan(plan, against=None) -> None:
    """The plan of the run: memory per GPU (per rank on the CPU) at its peak by term, the allowances (each
    said to be assumed or measured), what fits, the time; then what the project's last run measured."""
    from .planner import plan_summary

    if plan is None:
        return
    memory = plan.memory
    gib = 2**30
    per = "GPU" if plan.training.device == "cuda" else "rank"
    table = Table(title=f"memory per {per} at the peak ({memory.peak_phase.phase})")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for term, size in memory.peak_phase.terms.items():
        table.add_row(term, f"{size / gib:.2f}")
    table.add_section()
    table.add_row("peak (tensors allocated)", f"{memory.peak / gib:.2f}")
    for name, allowance in memory.allowances.items():
        table.add_row(f"+ {name} ({'assumed' if allowance.assumed else 'measured'})", f"{allowance.size / gib:.2f}")
    table.add_row("= needed", f"{memory.required / gib:.2f}")
    if plan.capacity is not None:
        verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
        table.add_row(f"of {escape(plan.capacity_source)}", f"{plan.capacity / gib:.2f}", end_section=True)
        table.add_row("", verdict)
    out.print(table)
    for line in plan_summary(plan):
        out.print(escape(line), highlight=False, soft_wrap=True)
    if against is not None and against.measurement is not None:
        show_measured(against)


def show_measured(against) -> None:
    """The plan's figures beside the last run's, with their ratio; or why that run is not this plan."""
    if against.differences:
        out.print(escape(f"the last run of this project ran other settings ({'; '.join(against.differences)}): "
                         "not compared"), highlight=False, soft_wrap=True)
        return
    table = Table(title=f"plan against the last run ({against.measurement.steps} steps measured)")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("", "left"), ("planned", "right"), ("measured", "right"), ("measured / planned", "right"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for row in against.comparisons:
        table.add_row(row.what, shown_figure(row.planned, row.unit), shown_figure(row.measured, row.unit),
                      "—" if row.ratio is None else f"{row.ratio:.2f}")
    out.print(table)


def shown_figure(value, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value / 2**30:.2f} GiB" if unit == "bytes" else f"{value:.3g} s"


# --- gpt prepare ----------------------------------------------------------------------------------------------


InputsArg = Annotated[Optional[list[str]], typer.Argument(
    help="Text files, directories, globs, .jsonl (.gz too), a saved `datasets` dir, or hf:NAME[/CONFIG].",
    show_default=False)]
PrepareOutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output dir (default: [data] dir).")]
ReplaceInvalidOpt = Annotated[bool, typer.Option(
    "--replace-invalid-utf8", help="Read invalid UTF-8 bytes as U+FFFD and count them (default: refuse).")]
PrepareForceOpt = Annotated[bool, typer.Option("--force", help="Replace prepared data gptcli wrote there before.")]
VerifyOpt = Annotated[Optional[Path], typer.Option(
    "--verify", help="Check a prepared dir (headers, sizes, checksums, token ids) instead of preparing.",
    show_default=False)]
# Options that stand for [data] keys.
ValFractionOpt = Annotated[Optional[float], key_option("data", "val_fraction")]
WorkersOpt = Annotated[Optional[int], key_option("data", "workers")]
TextColumnOpt = Annotated[Optional[str], key_option("data", "text_column")]
SeparatorOpt = Annotated[Optional[str], key_option("data", "separator")]
ShardTokensOpt = Annotated[Optional[int], key_option("data", "shard_tokens")]
VocabDirOpt = Annotated[Optional[str], key_option("data", "vocab_dir")]


@app.command("prepare")
def prepare_command(
    inputs: InputsArg = None,
    out_dir: PrepareOutOpt = None,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    val_fraction: ValFractionOpt = None,
    workers: WorkersOpt = None,
    text_column: TextColumnOpt = None,
    separator: SeparatorOpt = None,
    shard_tokens: ShardTokensOpt = None,
    vocab_dir: VocabDirOpt = None,
    replace_invalid_utf8: ReplaceInvalidOpt = False,
    force: PrepareForceOpt = False,
    verify: VerifyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize a corpus into verified token shards: parallel, constant memory, never half-written."""
    preparing = prepare_module()
    if verify is not None:
        return show_verify_report(preparing.verify_prepared(only_verify(verify, inputs)), as_json)
    given = dict(val_fraction=val_fraction, workers=workers, text_column=text_column, separator=separator,
                 shard_tokens=shard_tokens, vocab_dir=vocab_dir)
    config = load(project, [*(overrides or []), *option_overrides("data", given)])
    options = preparing.PrepareOptions.from_project(config, inputs or [], out_dir, force=force,
                                                    replace_invalid_utf8=replace_invalid_utf8)
    with prepare_progress() as on_progress:
        summary = preparing.prepare(options, on_progress)
    show_prepare_summary(summary, as_json, preparing.next_command(summary.out, config))


def prepare_module():
    """gptcli.data.prepare, imported with OpenBLAS kept to one thread: numpy's OpenBLAS would start a thread
    per core that spins for ~0.1 s of CPU the tokenizers need, and prepare never multiplies matrices. The
    variable must be set before numpy is first imported (here)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .data import prepare

    return prepare


def only_verify(verify: Path, inputs: Optional[list[str]]) -> Path:
    """--verify DIR checks a prepared dir; inputs beside it would be silently ignored."""
    if inputs:
        raise UsageError("--verify: give either INPUT... or --verify DIR, not both.")
    return verify


class prepare_progress:
    """A progress bar on stderr: bytes, documents, tokens/s and ETA for inputs of known size; documents and
    tokens for streams (datasets, hf:). A callback for the work to call."""

    def __enter__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[counts]}"),
                            console=err, transient=True)
        self.task = self.bar.add_task("prepare", total=None, counts="")
        self.started = False
        return self.update

    def update(self, progress) -> None:
        if not self.started:  # the bar's thread starts only once the work's worker processes exist
            self.bar.start()
            self.started = True
        counts = f"{progress.documents:,} docs · {progress.tokens:,} tokens · {progress.tokens_per_second:,.0f} tokens/s"
        if progress.eta_seconds is not None:
            minutes, seconds = divmod(int(progress.eta_seconds + 0.5), 60)
            counts += f" · ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        self.bar.update(self.task, completed=progress.done_bytes, total=progress.total_bytes or None, counts=counts)

    def __exit__(self, *exc):
        if self.started:
            self.bar.stop()


def show_prepare_summary(summary, as_json: bool, next_command: str) -> None:
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    if as_json:
        return emit_json(summary.to_json())
    table = Table(title=f"prepared {summary.out}")
    for column in ("", "train", "val", "total"):
        table.add_column(column, justify="right")
    for name, values in (("documents", summary.documents), ("tokens", summary.tokens), ("shards", summary.shards)):
        table.add_row(name, f"{values['train']:,}", f"{values['val']:,}", f"{sum(values.values()):,}")
    out.print(table)
    if len(summary.inputs) > 1:
        show_inputs(summary.inputs)
    split = summary.split
    rule = {"draw": "seeded draw", "last block": "last block held out (the draw picked none)",
            "too small": "none (corpus under two blocks)", "none": "none (val_fraction 0)"}[split["rule"]]
    out.print(f"val: {split['val_blocks']:,} of {split['blocks']:,} blocks of up to {split['block_tokens']:,} tokens; "
              f"rule: {rule}")
    out.print(f"{summary.bytes:,} bytes of text, {summary.tokens_per_byte:.3f} tokens per byte, "
              f"{summary.seconds:.1f} s with {summary.workers} worker(s) "
              f"({sum(summary.tokens.values()) / max(summary.seconds, 1e-9):,.0f} tokens/s)")
    out.print(f"next: {escape(next_command)}", highlight=False, soft_wrap=True)


# Inputs listed one by one in prepare's summary; the rest are one row of totals (--json lists every input).
INPUT_ROWS = 8
INPUT_WIDTH = 36  # characters of an input's name, so the table fits 80 columns


def show_inputs(inputs) -> None:
    """What each input gave: names relative to the inputs' common dir (so that 168 files of one dir do not
    read as 168 copies of its path), the first INPUT_ROWS of them, then the others' totals."""
    names = [count.input for count in inputs]
    common = os.path.commonpath(names) if all(os.path.isabs(n) == os.path.isabs(names[0]) for n in names) else ""
    if common in names or not common.strip(os.sep):  # one input holds the others, or nothing is shared
        common = ""
    where = f", in {name_tail(common + os.sep, INPUT_WIDTH)}" if common else ""
    table = Table("input", title=escape(f"by input{where}"))
    for column in ("documents", "tokens", "bytes of text"):
        table.add_column(column, justify="right")
    shown = inputs if len(inputs) <= INPUT_ROWS else inputs[:INPUT_ROWS - 1]
    for count in shown:
        name = os.path.relpath(count.input, common) if common else count.input
        table.add_row(escape(name_tail(name, INPUT_WIDTH)), f"{count.documents:,}", f"{count.tokens:,}",
                      f"{count.bytes:,}")
    rest = inputs[len(shown):]
    if rest:
        table.add_row(f"… and {len(rest):,} more inputs", *(f"{sum(getattr(c, key) for c in rest):,}"
                                                          for key in ("documents", "tokens", "bytes")))
    out.print(table)


def name_tail(name: str, width: int) -> str:
    """`name` cut from the left to `width` characters: the end of a path tells inputs apart."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1:]


def show_verify_report(report, as_json: bool) -> None:
    if as_json:
        return emit_json(report)
    tokens = report["tokens"]
    out.print(f"[green]✓[/green] {report['dir']}: {report['shards']} shards verified (headers, sizes, sha256, "
              f"token ids); {tokens['train']:,} train + {tokens['val']:,} val tokens, tokenizer {report['tokenizer']}")


# --- gpt train / gpt plot ----------------------------------------------------------------------------------


NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, help="Ranks on this machine (GPUs; CPU processes without CUDA).")]
HostfileOpt = Annotated[Optional[Path], typer.Option(
    "--hostfile", help="DeepSpeed hostfile: train on several machines.")]
MasterPortOpt = Annotated[Optional[int], typer.Option(
    "--master-port", min=1, max=65535,
    help="Rendezvous port (default: MASTER_PORT, else a free one; 29500 with --hostfile).")]
ResumeOpt = Annotated[Resume, typer.Option(
    "--resume", help="auto: continue from the latest checkpoint if any; required: fail without one; never: start "
    "fresh, refused where a run exists.")]
RestartOpt = Annotated[bool, typer.Option(
    "--restart", help="Delete what gpt train wrote in the run dir (checkpoints, metrics, model/), then start over.")]
OverfitBatchOpt = Annotated[bool, typer.Option(
    "--overfit-batch", help="Train on one batch over and over (sanity check: loss → ~0).")]
ConsolidateOpt = Annotated[bool, typer.Option(
    "--consolidate", help="Only write RUN/model from the latest checkpoint, then exit.")]


@app.command("train")
def train_command(
    ctx: typer.Context,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    nproc: NprocOpt = 1,
    hostfile: HostfileOpt = None,
    master_port: MasterPortOpt = None,
    resume: ResumeOpt = DEFAULT_RESUME,
    restart: RestartOpt = False,
    overfit_batch: OverfitBatchOpt = False,
    consolidate: ConsolidateOpt = False,
) -> None:
    """Pretrain with DeepSpeed ZeRO: checkpoints, exact resume, metrics, a consolidated model at the end.

    Exit codes: 0 done; 1 a user error; 4 a non-finite loss or gradient norm stopped the run (nothing of
    that step is saved); 128 + N stopped by signal N after saving (143 SIGTERM, 130 SIGINT)."""
    from .train.command import TrainRequest, run_train

    request = TrainRequest(project, overrides or [], nproc, hostfile, master_port, resume, restart, overfit_batch,
                           consolidate)
    # By name, not isinstance(click.Option): typer 0.2x vendors its own click, whose Option is another class.
    value_options = [name for param in ctx.command.params if getattr(param, "param_type_name", "") == "option"
                     and not getattr(param, "is_flag", False) for name in param.opts]
    exit_code = run_train(request, sys.argv[1:], value_options,
                          say=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))
    if exit_code:
        raise typer.Exit(exit_code)


RunDirArg = Annotated[Optional[Path], typer.Argument(
    help="A run directory (holds metrics.jsonl); default: the project's [project] out_dir.", show_default=False)]
PlotOutOpt = Annotated[Optional[Path], typer.Option("--out", help="PNG to write (default RUN_DIR/loss.png).")]


@app.command("plot")
def plot_command(
    run_dir: RunDirArg = None,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    output: PlotOutOpt = None,
) -> None:
    """Draw the loss curve of a run, finished or in progress, into a PNG."""
    from .train.observing.metrics import plot_losses

    if run_dir is None:
        run_dir = Path(load(project, overrides).project.out_dir)
    err.print(escape(f"Wrote {plot_losses(run_dir, output)}"), highlight=False, soft_wrap=True)


# --- gpt generate / gpt eval -------------------------------------------------------------------------------

CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Model dir, run dir, or one checkpoint of a run (RUN/checkpoints/step_N, "
                 "consolidated on the fly) (default: the project's out_dir, i.e. RUN/model)."),
]


def model_of(checkpoint: Optional[Path]):
    """--checkpoint as given (a model dir, a run dir, none), or a run's checkpoint consolidated on the fly
    (train/state/consolidation.model_dir_for; DeepSpeed is imported only then)."""
    from contextlib import nullcontext

    from .rundir import checkpoint_of

    if checkpoint is None or checkpoint_of(checkpoint) is None:
        return nullcontext(checkpoint)
    from .train.state.consolidation import model_dir_for

    return model_dir_for(checkpoint)
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
Bf16Opt = Annotated[bool, typer.Option("--bf16", help="bf16 autocast (fast on GPU; fp32 is the default).")]


PromptsArg = Annotated[Optional[list[str]], typer.Argument(
    help="Text to continue; several prompts run as one batch; '-' reads stdin. Default: [generate] prompt.",
    show_default=False)]
# Options that stand for [generate] keys.
MaxNewTokensOpt = Annotated[Optional[int], key_option("generate", "max_new_tokens")]
TemperatureOpt = Annotated[Optional[float], key_option("generate", "temperature")]
TopKOpt = Annotated[Optional[int], key_option("generate", "top_k")]
TopPOpt = Annotated[Optional[float], key_option("generate", "top_p")]
NumSamplesOpt = Annotated[Optional[int], key_option("generate", "num_samples", "--num-samples", "-n")]
SeedOpt = Annotated[Optional[int], key_option("generate", "seed")]
StopOpt = Annotated[Optional[list[str]], key_option("generate", "stop")]
LookaheadOpt = Annotated[Optional[int], key_option("generate", "lookahead")]


@app.command("generate")
def generate_command(
    prompts: PromptsArg = None,
    project: ProjectOpt = None,
    checkpoint: CheckpointOpt = None,
    overrides: SetOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    num_samples: NumSamplesOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    lookahead: LookaheadOpt = None,
    device: DeviceOpt = "auto",
    bf16: Bf16Opt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue prompts with a trained model: top-k / top-p / temperature sampling or greedy, with a KV cache."""
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "num_samples": num_samples, "seed": seed, "stop": stop, "lookahead": lookahead}
    config = load(project, [*(overrides or []), *option_overrides("generate", given)])
    from .generate import generate_for_project  # torch: imported once the configuration is known to be good

    with model_of(checkpoint) as model_dir:
        result = generate_for_project(config, prompts, checkpoint=model_dir, device=device, bf16=bf16,
                                      stream=None if as_json else write_now,
                                      on_notice=lambda message: err.print(f"note: {message}", highlight=False))
    show_samples(result, config.generate.num_samples, as_json)


def write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def show_samples(result, num_samples: int, as_json: bool) -> None:
    if as_json:
        return emit_json({"samples": [s.to_json() for s in result.samples]})
    if result.streamed:
        return write_now("\n")
    for number, sample in enumerate(result.samples):
        out.rule(f"prompt {sample.prompt_index + 1}, sample {number % num_samples + 1}", style="dim")
        out.print(sample.prompt + sample.text, markup=False, highlight=False, soft_wrap=True)


DatasetOpt = Annotated[Optional[str], typer.Option(
    help="Score a Hugging Face dataset: NAME or NAME:CONFIG on the Hub, or a save_to_disk dir.")]
DatasetSplitOpt = Annotated[str, typer.Option(help="Split of --dataset.")]
TaskOpt = Annotated[Optional[str], typer.Option(
    help=f"Score benchmarks instead, as lm-evaluation-harness does: {', '.join(TASKS.builtins)}, a group "
         f"({', '.join(TASKS.groups)}), or a plugin's task (comma-separated; docs/extending.md).",
    show_default=False)]
TaskDataOpt = Annotated[Optional[list[str]], typer.Option(
    help=f"{field_doc('eval', 'task_data')} Here: FILE (one task scored) or NAME=FILE, repeatable "
         "(default: [eval] task_data)", show_default=False)]
# Options that stand for [eval] keys.
EvalTextOpt = Annotated[Optional[str], key_option("eval", "text")]
EvalSplitOpt = Annotated[Optional[str], key_option("eval", "split")]
StrideOpt = Annotated[Optional[int], key_option("eval", "stride")]
BatchSizeOpt = Annotated[Optional[int], key_option("eval", "batch_size")]
MaxTokensOpt = Annotated[Optional[int], key_option("eval", "max_tokens")]
LimitOpt = Annotated[Optional[int], key_option("eval", "tasks_limit", "--limit")]
SplitsOpt = Annotated[Optional[str], key_option("eval", "splits")]
EvalSeedOpt = Annotated[Optional[int], key_option("eval", "seed")]
WriteSplitsOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Write conditional splits for the first N windows of the eval input into --splits FILE (drawn with "
                "--seed), instead of scoring.", show_default=False)]


@app.command("eval")
def eval_command(
    project: ProjectOpt = None,
    checkpoint: CheckpointOpt = None,
    overrides: SetOpt = None,
    text: EvalTextOpt = None,
    dataset: DatasetOpt = None,
    dataset_split: DatasetSplitOpt = "test",
    split: EvalSplitOpt = None,
    stride: StrideOpt = None,
    batch_size: BatchSizeOpt = None,
    max_tokens: MaxTokensOpt = None,
    task: TaskOpt = None,
    task_data: TaskDataOpt = None,
    limit: LimitOpt = None,
    splits: SplitsOpt = None,
    write_splits: WriteSplitsOpt = None,
    seed: EvalSeedOpt = None,
    device: DeviceOpt = "auto",
    bf16: Bf16Opt = False,
    as_json: JsonOpt = False,
) -> None:
    """Loss, perplexity and bits per byte under the run's objective on the val shards, a text file or a dataset;
    with --task, zero-shot task scores (HellaSwag, LAMBADA, PIQA, ARC, ..., `all`, a plugin's) beside GPT-2's."""
    if task is not None:
        return eval_tasks(project, checkpoint, overrides, task, task_data, limit, batch_size, device, bf16,
                          as_json, other=text or dataset)
    config = eval_config(project, overrides, {"text": text, "split": split, "stride": stride, "batch_size": batch_size,
                                              "max_tokens": max_tokens, "splits": splits, "seed": seed}, dataset)
    run_eval(config, write_splits, as_json, checkpoint=checkpoint, device=device, bf16=bf16, dataset=dataset,
             dataset_split=dataset_split)


def eval_config(project: Optional[Path], overrides: Optional[list[str]], given: dict, dataset: Optional[str]):
    """The project with gpt eval's options as [eval] overrides; --text and --dataset exclude each other."""
    if given["text"] is not None and dataset is not None:
        raise UsageError("--dataset: give --text or --dataset, not both.")
    return load(project, [*(overrides or []), *option_overrides("eval", given)])


def run_eval(config, write_splits: Optional[int], as_json: bool, **options) -> None:
    """Score (evaluate_with_progress) and show the result, or with --write-splits write the splits file."""
    if write_splits is None:
        return show_eval_result(evaluate_with_progress(config, **options), as_json)
    from .evaluate import write_project_splits

    written = write_project_splits(config, write_splits, dataset=options["dataset"],
                                   dataset_split=options["dataset_split"])
    if as_json:
        return emit_json(written)
    out.print(escape(f"Wrote {written['splits']}: {written['windows']} windows of {written['window_tokens']} tokens, "
                     f"{written['condition']:,} conditioned on and {written['evaluate']:,} to evaluate (seed "
                     f"{written['seed']})."), highlight=False)


def evaluate_with_progress(config, checkpoint: Optional[Path], **options):
    """evaluate.evaluate_project of `checkpoint` (model_of) under a progress bar. Torch is imported here, once the
    configuration is known to be good."""
    from .evaluate import evaluate_project

    with eval_progress() as progress, model_of(checkpoint) as model_dir:
        return evaluate_project(config, checkpoint=model_dir, progress=progress, **options)


class eval_progress:
    """A progress bar of scored tokens (or examples) on stderr with an ETA, shown once scoring starts (not
    while the model loads); with a `label` (the task), one bar per label."""

    def __init__(self, unit: str = "tokens"):
        self.unit = unit

    def __enter__(self):
        self.bar = None
        self.tasks = {}
        return self.update

    def update(self, done: int, total: int, label: str = "scoring") -> None:
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn(self.unit), TimeRemainingColumn(), console=err, transient=True)
            self.bar.start()
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[label], completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def eval_tasks(project, checkpoint, overrides, task: str, task_data, limit, batch_size, device, bf16,
               as_json: bool, other) -> None:
    """`gpt eval --task`: the names and files become [eval] tasks / task_data overrides."""
    if other:
        raise UsageError("--task: score either --task or --text/--dataset, not both.")
    names = [name.strip() for name in task.split(",") if name.strip()]
    given = {"tasks": names, "tasks_limit": limit, "batch_size": batch_size,
             "task_data": task_data_files(task_data, names) if task_data else None}
    config = load(project, [*(overrides or []), *option_overrides("eval", given)])
    from .tasks import evaluate_project_tasks  # torch: imported once the configuration is known to be good

    with eval_progress("examples") as progress, model_of(checkpoint) as model_dir:
        results = evaluate_project_tasks(config, config.eval.tasks, checkpoint=model_dir, device=device, bf16=bf16,
                                         progress=lambda name, done, total: progress(done, total, name))
    if as_json:
        return emit_json({"tasks": {r.name: r.to_json() for r in results}})
    show_task_results(results)


def task_data_files(values: list[str], names: list[str]) -> dict[str, str]:
    """--task-data values → {task: file}: NAME=FILE, or a bare FILE when one task is scored."""
    files = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(names) != 1:
                raise UsageError(f"--task-data: with several tasks, say which file is whose: NAME=FILE, not {value!r}.")
            name, path = names[0], value
        files[name.strip()] = path
    return files


def show_task_results(results) -> None:
    table = Table(title="zero-shot tasks (scored as lm-evaluation-harness 0.4)")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"), ("examples", "right"),
        ("published", "right"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    sources: dict[str, int] = {}  # a published score's source → its footnote number
    for result in results:
        for number, (metric, (value, stderr)) in enumerate(result.metrics.items()):
            published = result.published.get(metric)
            mark = ""
            if published is not None:
                mark = escape(f"{published.value:.4f} [{sources.setdefault(published.source, len(sources) + 1)}]")
            table.add_row(result.title if number == 0 else "", metric, f"{value:.4f}",
                          "—" if stderr is None else f"{stderr:.4f}", f"{result.examples:,}" if number == 0 else "", mark)
    out.print(table)
    shape = next((r.shape for r in results if r.shape), None)
    for source, number in sources.items():
        out.print(escape(f"[{number}] {shape}: {source}"), highlight=False)
    if shape is None:
        out.print("published: the model does not have a GPT-2 size's shape, so there is nothing to compare with.")
    for result in results:
        out.print(escape(f"{result.title}: {result.source}, {result.seconds:.1f} s"), highlight=False)


def show_eval_result(result, as_json: bool) -> None:
    if as_json:
        return emit_json(result.to_json())
    table = Table(title=f"eval: {result.source}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "objective" in result.extra:
        table.add_row("objective (what is scored)", str(result.extra["objective"]))
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("bits per byte", f"{result.bits_per_byte:.4f}")
    table.add_row("scored tokens", f"{result.tokens:,}")
    table.add_row("bytes", f"{result.bytes:,}")
    table.add_row("windows (context, stride)", f"{result.windows:,} ({result.context}, {result.stride})")
    table.add_row("perplexity, transformers guide weighting", f"{result.hf_perplexity:.3f}")
    table.add_row("tokens/s", f"{result.tokens / result.seconds:,.0f}" if result.seconds else "—")
    out.print(table)
    if result.sources:
        show_eval_sources(result)


def show_eval_sources(result) -> None:
    """A mixture's split: a row per source, then the total over all their tokens."""
    table = Table("source", title="by source (the total weights each by the tokens it scored)")
    for column in ("loss (nats/token)", "perplexity", "bits per byte", "scored tokens"):
        table.add_column(column, justify="right")
    for name, part in [*result.sources.items(), ("total", result)]:
        table.add_row(escape(name), f"{part.loss:.4f}", f"{part.perplexity:.3f}", f"{part.bits_per_byte:.4f}",
                      f"{part.tokens:,}")
    out.print(table)


# --- gpt load-hf / gpt export-hf --------------------------------------------------------------------------


HfSourceArg = Annotated[str, typer.Argument(
    help="A Hugging Face model dir, a weights file with config.json beside it, or a hub id such as gpt2-medium.")]
LoadOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Model dir to write.")]
HfVerifyOpt = Annotated[bool, typer.Option(
    "--verify", help="Also compare logits with transformers on real text; fail above 1e-4.")]
LoadForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing model dir at --out.")]


@app.command("load-hf")
def load_hf_command(
    source: HfSourceArg,
    out_dir: LoadOutOpt,
    verify: HfVerifyOpt = False,
    force: LoadForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert GPT-2 (any size, distilgpt2) or GPT-1 weights from Hugging Face into a gptcli model dir."""
    from .hf import load_hf

    report = load_hf(source, out_dir, verify=verify, force=force)
    if as_json:
        return emit_json(report.to_json())
    show_load_report(report)


def show_load_report(report) -> None:
    reference = ""
    if report.reference is not None:
        mark = "[green]✓[/green]" if report.matches else "[red]✗[/red]"
        reference = f" (reference {report.reference:,} for {report.preset} {mark})"
    out.print(f"{report.family} from {report.source}: {report.parameters:,} parameters{reference}, {report.dtype}")
    out.print(f"tokenizer: {report.tokenizer_note}", highlight=False)
    if report.max_abs_diff is not None:
        out.print(f"verify: max |logit difference| vs transformers = {report.max_abs_diff:.3g} "
                  f"(tolerance {report.to_json()['tolerance']:g}) [green]✓[/green]")
    out.print(escape(f"Wrote {report.out}"), highlight=False, soft_wrap=True)


ExportSourceArg = Annotated[Path, typer.Argument(
    help="A gptcli model dir, a run dir (its consolidated model), or one checkpoint of a run "
         "(RUN/checkpoints/step_N).")]
ExportOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Hugging Face dir to write.")]
ExportForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing dir at --out.")]


@app.command("export-hf")
def export_hf_command(
    checkpoint: ExportSourceArg,
    out_dir: ExportOutOpt,
    force: ExportForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a model as a Hugging Face dir (config.json, model.safetensors, tokenizer files) for from_pretrained."""
    from .hf import export_hf

    with model_of(checkpoint) as model_dir:
        report = export_hf(model_dir, out_dir, force=force)
    if as_json:
        return emit_json(report.to_json())
    out.print(escape(f"Wrote {report.out} ({report.family}, {report.tensors} tensors): {', '.join(report.files)}"),
              highlight=False, soft_wrap=True)


# --- entry point ----------------------------------------------------------------------------------------------


def main() -> None:
    """Run the app; user errors become one sentence on stderr and a non-zero exit. SIGTERM stops a command
    the way Ctrl-C does (its cleanup runs) as a `Stopped`, printed with where the work stopped when the
    command says so, and exits 128 + the signal (143; 130 for a Ctrl-C a command turned into `Stopped`).
    Called as the program (the `gpt` script, `python -m gptcli`), a Ctrl-C or SIGTERM once the command has
    ended is ignored: there is nothing left to stop, and Python would print "Exception ignored ...
    KeyboardInterrupt" from its shutdown."""
    import signal

    from .errors import Stopped

    as_program = sys._getframe(1).f_globals.get("__name__") == "__main__"

    def stop(signal_number, frame):
        raise Stopped(signal_number)

    signal.signal(signal.SIGTERM, stop)  # commands with their own handling (train) install theirs over it
    try:
        check_process()
        app()
    except (GptError, Stopped, KeyboardInterrupt, Exception) as error:
        sys.exit(report(error))
    finally:
        if as_program:
            for signal_number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signal_number, signal.SIG_IGN)
            # The command has ended and closed what it wrote: spare the interpreter's exit a collection that
            # scans every object the imports made (torch, DeepSpeed: 1-3 s of a `gpt train` on 2 cores).
            gc.freeze()


def check_process() -> None:
    """What a command needs of the process it runs in, before it starts: a current directory that exists (a
    deleted one made torch's import fail with "oneMKL FATAL ERROR"), and descriptors 1 and 2 (`>&-` closes
    them: the next file opened would become descriptor 1, and what is printed would land in it)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise GptError("The current directory no longer exists (it was deleted or moved away); cd into an existing "
                       "directory and run the command again.") from None
    closed = []
    for descriptor in (1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != descriptor:
                os.dup2(null, descriptor)
                os.close(null)
            closed.append(descriptor)
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False)
    if 1 in closed:
        sys.stdout = open(1, "w", closefd=False)
        err.print("note: standard output is closed; what this command prints there is discarded.", highlight=False)


def report(error: BaseException) -> int:
    """Say what ended the command, in one line on stderr; returns the exit code."""
    import signal

    from .errors import Stopped
    from .fsutil import no_room_sentence

    if isinstance(error, GptError):
        err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return error.exit_code
    if isinstance(error, Stopped):
        where = f": {error.where}" if error.where else ""
        err.print(escape(f"stopped by {signal.Signals(error.signal_number).name}{where}"), highlight=False,
                  soft_wrap=True)
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        err.print("interrupted", highlight=False)
        return 130
    if os.environ.get("GPTCLI_DEBUG"):  # a bug: say so in one line; the traceback on request
        raise error
    no_room = no_room_sentence(error, getattr(error, "filename", None) or "a file",
                               "what was complete before it is kept")
    if no_room is not None:  # a disk that fills where no command says more: still one sentence
        return report(no_room)
    err.print(f"[bold red]internal error:[/bold red] {type(error).__name__}: {escape(str(error))} "
              "(set GPTCLI_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
    return 1


if __name__ == "__main__":
    main()
