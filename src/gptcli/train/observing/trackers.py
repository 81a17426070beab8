"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow (`[train] trackers`).

Each tracker gets what metrics.jsonl gets, from the same records: every number of every step's record
(nested tables flattened as "tasks/hellaswag/acc"), the resolved project as the run's config with the
parameter count, the periodic samples as text, and at the end loss.png and the consolidated model's
path. Only rank 0 has trackers (MetricsWriter fans the records out to them).

A resumed run continues the same tracker run: its id is kept in RUN/trackers.json. Steps re-run after
a resume carry the values they had (resume is exact): TensorBoard purges the events after the resumed
step; W&B online and MLflow skip the steps they already hold; W&B offline writes a new segment of the
same run id, where those steps appear a second time with the same values.

Each tracker's library calls run on a thread of its own (Worker), so a step never waits for a library or
a server; before a checkpoint they are written out, so what was logged up to it survives a kill after it.

The libraries are optional and imported only here, only when asked for (mlflow alone takes seconds);
their own environment variables apply (WANDB_MODE, WANDB_DIR, WANDB_ENTITY, MLFLOW_TRACKING_URI, ...).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

from ...config import Project, dump_toml
from ...errors import GptError
from ...fsutil import atomic_write_json
from ...rundir import MLFLOW_DIR, TENSORBOARD_DIR, TRACKERS_FILE

# The module each tracker imports, and the extra of pyproject.toml that installs it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# MLflow's limits per log_batch call (mlflow.utils.validation: MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH).
MLFLOW_METRICS_PER_BATCH = 1000
MLFLOW_PARAMS_PER_BATCH = 100
# TensorBoard's event queue (one event a step) and how often its thread flushes the file: between
# checkpoints a killed run loses at most the last TENSORBOARD_FLUSH_S seconds of events (torch's default: 120).
TENSORBOARD_QUEUE = 1000
TENSORBOARD_FLUSH_S = 2
# How long a checkpoint, and the end of a run, wait for a tracker's calls still queued (a slow server)
# before going on without them.
FLUSH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 60.0


class Tracker(Protocol):
    name: str

    def log(self, record: dict) -> None: ...

    def text(self, step: int, key: str, text: str) -> None: ...

    def end(self, step: int, plot: Optional[Path], model_dir: Optional[Path]) -> None: ...

    def flush(self) -> None:  # before a checkpoint
        ...

    def close(self, status: str) -> None:  # "finished", "stopped" (by a signal) or "failed"
        ...


# --- which, and whether they can run ---------------------------------------------------------------------------


def requested(project: Project) -> list[str]:
    """The trackers asked for, each once: train.trackers, plus TensorBoard for train.tensorboard = true."""
    names = list(project.train.trackers) + ["tensorboard"] * project.train.tensorboard
    return list(dict.fromkeys(names))


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def check_trackers(project: Project) -> None:
    """Pre-flight: every tracker asked for has its package installed (one sentence if not, before anything
    slow starts), and the older `train.tensorboard = true` gets its migration note."""
    legacy = project.train.tensorboard and "tensorboard" not in project.train.trackers
    missing = [name for name in requested(project) if not installed(PACKAGES[name])]
    if missing:
        key = "train.tensorboard = true" if legacy and missing == ["tensorboard"] else "train.trackers"
        packages = " and ".join(PACKAGES[name] for name in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise GptError(f"{key} asks for {', '.join(missing)}, but {packages} {verb} not installed: "
                       f"pip install \"gptcli[{','.join(missing)}]\".")
    if legacy and os.environ.get("RANK", "0") == "0":
        print('note: train.tensorboard = true is now written train.trackers = ["tensorboard"] (it still works).',
              file=sys.stderr)


# --- starting them ---------------------------------------------------------------------------------------------


def start_trackers(project: Project, run_dir: Path, step: int,
                   wrap: Callable[[Tracker], Tracker] = lambda tracker: tracker,
                   say: Callable[[str], None] = lambda line: None) -> list[Tracker]:
    """Rank 0: the trackers of the project for a run that continues after `step` (0: a fresh start), in
    the tracker runs RUN/trackers.json names. One that cannot start (no login, server unreachable) is a
    warning: the training runs without it. `wrap`: faults injected by tests; `say`: the phase line."""
    names = requested(project)
    if not names:
        return []
    from ...inspect import inspect_parameters

    say(f"starting the trackers: {', '.join(DISPLAY_NAMES[name] for name in names)}")
    run_dir = Path(run_dir)
    start = TrackerStart(project=project, run_dir=run_dir, step=step, ids=read_ids(run_dir),
                         parameters=inspect_parameters(project.model).total)
    trackers = []
    for name in names:
        try:
            tracker = STARTERS[name](start)
        except Exception as error:  # a library's own failure, whatever its type
            warn(DISPLAY_NAMES[name], error, "could not start")
            continue
        trackers.append(wrap(tracker))
    if start.ids_changed:
        atomic_write_json(run_dir / TRACKERS_FILE, start.ids)
    return trackers


class TrackerStart:
    """What every tracker starts from: the run's config, the step it resumes from, the stored run ids."""

    def __init__(self, project: Project, run_dir: Path, step: int, ids: dict, parameters: int):
        self.project, self.run_dir, self.step, self.ids, self.parameters = project, run_dir, step, ids, parameters
        self.ids_changed = False
        self.config = {"parameters": parameters, **project.to_dict()}
        self.config_text = f"# parameters: {parameters:,}\n{dump_toml(project)}"

    def remember(self, name: str, value: dict) -> None:
        if self.ids.get(name) != value:
            self.ids[name], self.ids_changed = value, True

    def tracker_project(self, environment_variable: str) -> str:
        train = self.project.train
        return train.tracker_project or os.environ.get(environment_variable) or self.project.project.name

    def run_name(self, environment_variable: Optional[str] = None) -> str:
        train = self.project.train
        return (train.tracker_run_name or (environment_variable and os.environ.get(environment_variable))
                or Path(self.project.project.out_dir).resolve().name)


def read_ids(run_dir: Path) -> dict:
    try:
        ids = json.loads((Path(run_dir) / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def warn(name: str, error: BaseException, what: str = "failed", then: str = "the run goes on without it") -> None:
    """One line on stderr: the tracker, what happened, the first line of the library's error."""
    lines = str(error).strip().splitlines() or [""]
    detail = f"{type(error).__name__}: {lines[0][:300]}".rstrip(": ")
    print(f"warning: {name} {what} ({detail}); {then}.", file=sys.stderr, flush=True)


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a step's record by name, whatever keys it holds (the step itself left out); a
    nested table's numbers are named "table/key"."""
    found = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            found[name] = value
    return found


# --- TensorBoard -----------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Events in RUN/tensorboard, scalars as "train/KEY" in float64 (TensorBoard's default float32 would
    round the values metrics.jsonl holds). The summaries are built and written on the worker thread."""

    name = "TensorBoard"

    def __init__(self, start: TrackerStart):
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import scalar

        self.summary, self.scalar = Summary, scalar
        # Points a killed run logged after the step this run resumes from are purged, not shown twice. The
        # writer's own thread flushes the file every TENSORBOARD_FLUSH_S; its queue is long enough that the
        # worker never waits for it (torch's 10 did, for about 1 ms a step).
        self.writer = SummaryWriter(str(start.run_dir / TENSORBOARD_DIR), purge_step=start.step + 1,
                                    max_queue=TENSORBOARD_QUEUE, flush_secs=TENSORBOARD_FLUSH_S)
        self.writer.add_text("config", indented(start.config_text), start.step)
        self.calls = Worker("TensorBoard")

    def log(self, record: dict) -> None:
        self.calls.submit(self.write_scalars, scalars(record), record["step"])

    def write_scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding every value of the step (add_scalar writes one event per value: twice the cost)."""
        summaries = [self.scalar(f"train/{key}", value, new_style=True, double_precision=True) for key, value in
                     values.items()]
        self.writer.file_writer.add_summary(self.summary(value=[v for s in summaries for v in s.value]), step)

    def text(self, step: int, key: str, text: str) -> None:
        self.calls.submit(self.writer.add_text, key, indented(text), step)

    def end(self, step: int, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if plot is not None:
            self.calls.submit(self.write_image, "loss_curve", plot, step)
        if model_dir is not None:
            self.calls.submit(self.writer.add_text, "model_dir", str(model_dir), step)

    def write_image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(tag, matplotlib.image.imread(path), step, dataformats="HWC")

    def flush(self) -> None:
        self.calls.submit(self.writer.flush)
        self.calls.wait(FLUSH_TIMEOUT_S)

    def close(self, status: str) -> None:
        try:
            self.calls.finish(CLOSE_TIMEOUT_S)
        finally:
            self.writer.close()


def indented(text: str) -> str:
    """Text shown as written: TensorBoard renders text as Markdown, where 4 spaces make a code block."""
    return "\n".join(f"    {line}" for line in text.splitlines())


# --- Weights & Biases ------------------------------------------------------------------------------------------


class WandbTracker:
    """A W&B run in RUN/wandb (WANDB_DIR when set), online or offline as WANDB_MODE says."""

    name = "W&B"

    def __init__(self, start: TrackerStart):
        import wandb

        self.wandb = wandb
        options = dict(project=start.tracker_project("WANDB_PROJECT"), name=start.run_name("WANDB_NAME"),
                       config=start.config, allow_val_change=True,
                       dir=None if os.environ.get("WANDB_DIR") else str(start.run_dir))
        run_id = (start.ids.get("wandb") or {}).get("id")
        self.run = None
        if run_id and start.step > 0 and os.environ.get("WANDB_MODE", "online") == "online":
            try:  # rewind: drop what the killed run logged after the checkpoint (a W&B preview feature)
                self.run = wandb.init(resume_from=f"{run_id}?_step={start.step + 1}", **options)
            except Exception:  # not enabled for this account, or the run is not on the server
                self.run = None
        if self.run is None:
            self.run = wandb.init(id=run_id, resume="allow" if run_id else None, **options)
        # W&B keeps the steps it holds and ignores lower ones: skip those (they hold the same values).
        self.next_step = self.run.step
        start.remember("wandb", {"id": self.run.id})
        # run.log waits for W&B's own thread to hand the data to its process (about 1-2 ms a step on a
        # busy 2-core machine, bench/trackers.py): the worker waits instead of the step.
        self.calls = Worker(f"W&B ({self.run.id})")

    def log(self, record: dict) -> None:
        # Committed at once: W&B would otherwise hold the step's row until the next step, and a killed
        # run would lose it.
        if record["step"] >= self.next_step:
            self.calls.submit(self.run.log, scalars(record), record["step"], True)

    def text(self, step: int, key: str, text: str) -> None:
        if step >= self.next_step:  # before the step's record, which commits the row
            table = self.wandb.Table(columns=["step", "text"], data=[[step, text]])
            self.calls.submit(self.run.log, {key: table}, step, False)

    def end(self, step: int, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if plot is not None:  # the last step's row is committed: the plot goes into the summary
            self.calls.submit(self.run.summary.__setitem__, "loss_curve", self.wandb.Image(str(plot)))
        if model_dir is not None:
            self.calls.submit(self.run.summary.__setitem__, "model_dir", str(model_dir))

    def flush(self) -> None:
        """The calls queued are handed to W&B; W&B itself has no call to write them out: its process writes
        RUN/wandb every 15 s (its setting x_transaction_log_flush_interval)."""
        self.calls.wait(FLUSH_TIMEOUT_S)

    def close(self, status: str) -> None:
        try:
            self.calls.finish(CLOSE_TIMEOUT_S)
        finally:
            self.run.finish(exit_code=0 if status == "finished" else 1)


# --- MLflow ----------------------------------------------------------------------------------------------------


class MlflowTracker:
    """An MLflow run in MLFLOW_TRACKING_URI's store, else in RUN/mlflow/mlflow.db (SQLite, artifacts beside
    it). Calls run on a worker thread, so a slow server never holds up a step."""

    name = "MLflow"

    def __init__(self, start: TrackerStart):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = start.run_dir.resolve() / MLFLOW_DIR
        if not uri:
            local.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        saved = start.ids.get("mlflow") or {}
        if saved.get("tracking_uri") == uri and self.usable(saved.get("run_id")):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            held = self.client.get_run(self.run_id).data.to_proto().metrics
            self.next_step = max((metric.step for metric in held), default=0) + 1  # those it holds are kept
        else:
            experiment = self.experiment(start.tracker_project("MLFLOW_EXPERIMENT_NAME"),
                                         None if os.environ.get("MLFLOW_TRACKING_URI") else local / "artifacts")
            self.run_id = self.client.create_run(experiment, run_name=start.run_name()).info.run_id
            self.next_step = 0
        start.remember("mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        self.log_config(start)
        self.calls = Worker(f"MLflow ({uri})", self.log_metrics)

    def usable(self, run_id: Optional[str]) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted, or not in this store
            return False

    def experiment(self, name: str, artifacts: Optional[Path]) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)

    def log_config(self, start: TrackerStart) -> None:
        """The project as parameters ("train.lr"); a resumed run adds the new keys only (MLflow refuses to
        change a parameter's value), and its config.resolved.toml artifact is the latest one."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params
        params = [Param(key, value) for key, value in flat_params(start.config) if key not in held]
        for first in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + MLFLOW_PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, start.config_text, "config.resolved.toml")

    def log(self, record: dict) -> None:
        step, now = record["step"], int(time.time() * 1000)
        if step >= self.next_step:
            self.calls.submit("metrics", [self.metric(key, float(value), now, step)
                                          for key, value in scalars(record).items()])

    def text(self, step: int, key: str, text: str) -> None:
        if step >= self.next_step:
            self.calls.submit(self.client.log_text, self.run_id, text, f"{key}s/step_{step:08d}.txt")

    def end(self, step: int, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if plot is not None:
            self.calls.submit(self.client.log_artifact, self.run_id, str(plot))
        if model_dir is not None:
            self.calls.submit(self.client.set_tag, self.run_id, "model_dir", str(model_dir))

    def flush(self) -> None:
        self.calls.wait(FLUSH_TIMEOUT_S)

    def close(self, status: str) -> None:
        if not self.calls.failed:
            state = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
            self.calls.submit(self.client.set_terminated, self.run_id, state)
        self.calls.finish(CLOSE_TIMEOUT_S)

    def log_metrics(self, metrics: list) -> None:
        for first in range(0, len(metrics), MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + MLFLOW_METRICS_PER_BATCH])


def flat_params(config: dict, prefix: str = ""):
    """(name, value) of each key of the config, nested tables as "section.key", values as TOML writes them."""
    from ...config import toml_value

    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from flat_params(value, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}", value if isinstance(value, str) else toml_value(value)


class Worker:
    """A tracker's calls, run in order on a thread of their own, so that a step never waits for a library
    or a server. "metrics" calls queued while another call was under way go out together, in one call of
    `log_metrics`. An error comes back from the next `submit` (so the tracker is switched off with one
    warning) and the calls after it are dropped."""

    def __init__(self, name: str, log_metrics: Optional[Callable[[list], None]] = None):
        self.queue: queue.Queue = queue.Queue()
        self.error: Optional[BaseException] = None
        self.log_metrics = log_metrics
        self.thread = threading.Thread(target=self.work, name=name, daemon=True)
        self.thread.start()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def submit(self, call, *args) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((call, args))

    def wait(self, timeout: float) -> None:
        """Until the calls queued so far are done (or failed), at most `timeout` seconds."""
        done = threading.Event()
        self.submit("wake", done)
        done.wait(timeout)

    def work(self) -> None:
        while True:
            items = [self.queue.get()]
            while not self.queue.empty() and items[-1] is not None:
                items.append(self.queue.get())
            for call, args in batched(items):
                if call is None:
                    return
                if call == "wake":  # a wait() (it is woken even after an error)
                    args[0].set()
                elif self.error is None:
                    try:
                        (self.log_metrics if call == "metrics" else call)(*args)
                    except Exception as error:
                        self.error = error

    def finish(self, timeout: float) -> None:
        """Wait for the queued calls (at most `timeout` seconds), then raise the error one of them met."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"calls still queued after {timeout:.0f} s")
        if self.error is not None:
            raise self.error


def batched(items: list) -> list:
    """Consecutive "metrics" items merged into one; None (the end) kept as (None, ())."""
    merged = []
    for item in items:
        if item is None:
            merged.append((None, ()))
        elif item[0] == "metrics" and merged and merged[-1][0] == "metrics":
            merged[-1][1][0].extend(item[1][0])
        else:
            merged.append((item[0], (list(item[1][0]),) if item[0] == "metrics" else item[1]))
    return merged


DISPLAY_NAMES = {"tensorboard": TensorBoardTracker.name, "wandb": WandbTracker.name, "mlflow": MlflowTracker.name}
STARTERS: dict[str, Callable[[TrackerStart], Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
