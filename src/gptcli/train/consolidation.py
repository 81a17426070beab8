"""Handing the weights over: after training, rank 0 writes the latest checkpoint's fp32 master weights as
RUN/model (checkpoint.consolidate) and draws loss.png; `gpt train --consolidate` does the same for a run
that stopped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..config import Project
from ..errors import GptError
from . import checkpoint
from .engine import device_type, prepare_environment
from .lock import RunDirClaim
from .metrics import plot_losses


def hand_over(project: Project, run_dir: Path, tokenizer, step: int, exit_code: int) -> Optional[Path]:
    """Rank 0, at the end of a run: consolidate when it finished (a stopped run keeps its checkpoint for
    `--resume`), draw the loss curve, and say where everything is. Returns the model dir, if written."""
    tag = checkpoint.read_latest(run_dir)
    model_dir = None
    if exit_code == 0 and tag is not None:
        model_dir = checkpoint.consolidate(run_dir, tag, project.model, tokenizer)
    plot_losses(run_dir)
    where = f"; model in {model_dir}" if model_dir else ""
    reason = f" (stopped by signal {exit_code - 128})" if exit_code else ""
    print(f"Finished at step {step}{reason}: run dir {run_dir}{where}.", file=sys.stderr)
    return model_dir


def consolidate_only(project: Project) -> Path:
    """`gpt train --consolidate`: the latest checkpoint of the run dir → RUN/model, without training."""
    from ..tokenizer import load_tokenizer
    from .continuation import checkpoint_project

    prepare_environment(device_type(project))
    run_dir = Path(project.project.out_dir)
    tag = checkpoint.read_latest(run_dir)
    if tag is None:
        raise GptError(f"{checkpoint.checkpoints_dir(run_dir)} has no complete checkpoint to consolidate.")
    client = checkpoint.read_client_state(run_dir, tag)
    project = checkpoint_project(project, client, tag)  # a run started from weights: [model] from its checkpoint
    checkpoint.check_architecture(client, project.model, tag)
    tokenizer = load_tokenizer(project.data.tokenizer, project.data.vocab_dir)
    with RunDirClaim() as claim:  # RUN/model must not be written under a running training
        claim.take(run_dir, rank=0)
        return checkpoint.consolidate(run_dir, tag, project.model, tokenizer)
