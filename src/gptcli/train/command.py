"""`gpt train` from its parsed options: adopt a cluster launcher's ranks, start ranks of our own, or train
this rank. Kept free of torch and DeepSpeed imports until a rank really trains, so a configuration error
is reported in a fraction of a second."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..config import load_project
from . import launch


@dataclass
class TrainRequest:
    """What the command line asked of `gpt train`."""

    project_file: Optional[Path]
    overrides: list[str]
    nproc: int = 1
    hostfile: Optional[Path] = None
    master_port: Optional[int] = None
    resume: str = "auto"
    restart: bool = False
    overfit_batch: bool = False
    consolidate: bool = False


def run_train(request: TrainRequest, argv: list[str], value_options: Iterable[str],
              say: Callable[[str], None]) -> int:
    """Carry out `request`; returns the exit code. `argv` is the command line after `gpt` (the ranks this
    process starts run it, less the launcher's own options); `value_options` names the options that take a
    value, so that rank_argv keeps each value with its option."""
    launch.die_with_launcher()
    launch.adopt_cluster_ranks()
    launch.refuse_launcher_options_in_rank(os.environ, request.nproc, request.hostfile)
    project = load_project(request.project_file, request.overrides)  # a configuration error stops here
    if request.consolidate:
        from .consolidation import consolidate_only

        say(f"Wrote {consolidate_only(project)}")
        return 0
    if request.nproc > 1 or request.hostfile is not None:
        return launch.launch(launch.rank_argv(argv, value_options), request.nproc, request.hostfile,
                             request.master_port)
    if request.master_port is not None:
        os.environ["MASTER_PORT"] = str(request.master_port)
    from .loop import TrainOptions, train

    options = TrainOptions(resume=request.resume, overfit_batch=request.overfit_batch, restart=request.restart)
    return train(project, options).exit_code
