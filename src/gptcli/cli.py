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


# --- gpt train / gpt plot ----------------------------------------------------------------------------------


@app.command("train")
def train_command(
    project: ProjectOpt = None,
    overrides: SetOpt = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Ranks on this machine (GPUs; CPU processes without CUDA).")] = 1,
    hostfile: Annotated[Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile: train on several machines.")] = None,
    resume: Annotated[str, typer.Option("--resume", help="auto: continue from the latest checkpoint if any; required: fail without one; never: start over.")] = "auto",
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
                "--resume", resume, *(["--overfit-batch"] if overfit_batch else [])]
        raise typer.Exit(launch(argv, nproc, str(hostfile) if hostfile else None))
    result = train(config, TrainOptions(resume=resume, overfit_batch=overfit_batch))
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


# --- entry point ----------------------------------------------------------------------------------------------


def main() -> None:
    """Run the app; user errors become one sentence on stderr and a non-zero exit."""
    try:
        app()
    except GptError as error:
        err.print(f"[bold red]error:[/bold red] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as error:  # a bug: say so in one line; the traceback on request
        if os.environ.get("GPTCLI_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/bold red] {type(error).__name__}: {error} "
                  "(set GPTCLI_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
