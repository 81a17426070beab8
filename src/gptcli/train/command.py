"""`gpt train` from its parsed options: adopt a cluster launcher's ranks, start ranks of our own, or train
this rank. Kept free of torch and DeepSpeed imports until a rank really trains, so a configuration error
is reported in a fraction of a second."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..config import DEFAULT_RESUME, Project, Resume, load_project
from ..errors import GptError, Stopped
from ..planner import gib, plan_run
from .launching import launch


@dataclass
class TrainRequest:
    """What the command line asked of `gpt train`."""

    project_file: Optional[Path]
    overrides: list[str]
    nproc: int = 1
    hostfile: Optional[Path] = None
    master_port: Optional[int] = None
    resume: Resume = DEFAULT_RESUME
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
    launch.check_rank_environment(os.environ)  # one sentence naming a variable, before DeepSpeed reads it
    launch.refuse_launcher_options_in_rank(os.environ, request.nproc, request.hostfile)
    project = load_project(request.project_file, request.overrides)  # a configuration error stops here
    if request.consolidate:
        from .state.consolidation import consolidate_only

        say(f"Wrote {consolidate_only(project)}")
        return 0
    if "RANK" not in os.environ or launch.LAUNCHER_PID_VARIABLE not in os.environ:  # our launcher checked it
        check_trainable(project)
        check_out_dir(Path(project.project.out_dir))
        check_fits(project, request.nproc)
    if request.nproc > 1 or request.hostfile is not None:
        return launch.launch(launch.rank_argv(argv, value_options), request.nproc, request.hostfile,
                             request.master_port)
    if request.master_port is not None:
        os.environ["MASTER_PORT"] = str(request.master_port)
    from .loop import TrainOptions, train

    options = TrainOptions(resume=request.resume, overfit_batch=request.overfit_batch, restart=request.restart)
    try:
        result = train(project, options)
    except (Exception, Stopped, KeyboardInterrupt) as error:
        code = launch.quiet_exit_code(error)
        if code is None:
            raise
        return code  # the launcher reports it, once, for every rank
    if result.model_dir is not None and not request.overfit_batch and os.environ.get("RANK", "0") == "0":
        say("next: " + "\n      ".join(next_commands(request, project)))
    return result.exit_code


def check_trainable(project: Project) -> None:
    """Rules of pretraining that the model itself does not have: the attention pattern must fit the
    objective, proven on a small model before anything slow starts (leaks.check_fit: a prediction that can
    see what its objective hides is one sentence, whatever the pattern is called)."""
    from ..leaks import check_fit

    check_fit(project)


def check_out_dir(run_dir: Path) -> None:
    """Before DeepSpeed starts: a run dir that is a file or lies under one is one sentence at once (rank 0
    checks it again, creating it, when it locks it)."""
    for path in (run_dir, *run_dir.absolute().parents):
        if path.exists():
            if path == run_dir and not path.is_dir():
                raise GptError(f"project.out_dir {run_dir} is a file, not a directory; choose another out_dir.")
            if not path.is_dir():
                raise GptError(f"Cannot create the run dir {run_dir}: {path} is a file; choose a writable "
                               "project.out_dir.")
            return


def check_fits(project: Project, nproc: int, available: Optional[int] = None) -> None:
    """Before any rank starts, on the CPU: the plan (planner.plan_run) of each rank of this machine against
    its share of the memory this machine has free (`available`, else machine.available_memory); a run that
    clearly cannot fit is one sentence naming the change that would. On a GPU each rank's pre-flight holds
    the plan against its GPU's free memory. train.memory_check = false starts the run anyway."""
    from ..machine import available_memory
    from .engine import device_type
    from .preflight import check_memory

    if not project.train.memory_check or device_type(project) != "cpu":
        return
    free = available_memory() if available is None else available
    if free is None:
        return
    local_ranks = max(nproc, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    ranks = max(local_ranks, int(os.environ.get("WORLD_SIZE", "1") or 1))
    source = (f"each of {local_ranks} ranks' share of the {gib(free)} this machine has free" if local_ranks > 1
              else "what this machine has free")
    check_memory(project, plan_run(project, device="cpu", ranks=ranks, capacity=free // local_ranks,
                                   capacity_source=source))


def next_commands(request: TrainRequest, project: Project) -> list[str]:
    """The commands that use the model a run just wrote, with the project and the overrides that say where
    its run dir and data are (training-only overrides left out)."""
    args = [*(["--project", str(request.project_file)] if request.project_file else []),
            *[f"--set={item}" for item in request.overrides if item.startswith(("project.", "data."))]]
    quoted = "".join(f" {shlex.quote(arg)}" for arg in args)
    return [f"gpt generate {shlex.quote(project.generate.prompt)}{quoted}", f"gpt eval{quoted}"]
