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
    rich_markup_mode="rich",
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
        help="Text files, directories, globs, .jsonl (.gz too), a saved `datasets` dir, or hf:NAME\\[/CONFIG].",
        show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output dir (default: \\[data] dir).")] = None,
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        min=0.0, max=0.999999, help="Fraction of documents held out for val (default: \\[data] val_fraction).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=0, help="Tokenizer processes; 0 = one per core (default: \\[data] workers).")] = None,
    text_column: Annotated[Optional[str], typer.Option(
        help="Field with the text in .jsonl records and datasets (default: \\[data] text_column).")] = None,
    separator: Annotated[Optional[str], typer.Option(
        help="Documents inside a text file: none (one per file), blank-line or line (default: \\[data] separator).")
    ] = None,
    shard_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="Tokens per shard file (default: \\[data] shard_tokens).")] = None,
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
