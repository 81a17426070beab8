"""Experiment trackers beside metrics.jsonl (`[train] trackers`): the protocol every tracker follows, gptcli's
side of it, and the built-in ones: TensorBoard, Weights & Biases and MLflow.

The protocol (docs/extending.md, "Trackers"). A tracker is made by a factory the registry finds
(registry.TRACKERS: a built-in, an installed plugin's entry point, "module:attr", "file.py:attr"):

    factory(run_dir: Path, config: dict, resume_step: int) -> tracker   (resume_step 0: a fresh run)
    tracker.last_step() -> int                   the last step it holds, 0 if none
    tracker.log(step: int, metrics: dict[str, float])
    tracker.close()

A tracker drops what it holds above resume_step where it can. gptcli first sends it metrics.jsonl's steps
after last_step() (those it lacks: a killed run's buffered steps, or a tracker added to a running
project), then one `log` per new step, with the numbers metrics.jsonl gets: so after a kill -9 at any
moment and a resume it holds every step of metrics.jsonl exactly once. One that cannot drop steps (MLflow,
W&B) reports the higher last step, and gptcli sends only the steps above it.

Optional, called only where a tracker has them: `text(step, key, text)` (the periodic samples), `flush()`
(before a checkpoint), `end(step, status, plot, model_dir)` (a run that ends in order: status "finished"
or "stopped"; loss.png and RUN/model, each None when absent). A factory may carry `title` (how messages
name it), `requires` (the module it imports, which pre-flight checks is installed) and `install` (what to
pip install when it is not). A tracker that raises is switched off with one warning; the run goes on.

The built-ins get, from the same records: every number of every step's record (nested tables as
"tasks/hellaswag/acc"), the resolved project as the run's config with the parameter count, the samples as
text, and at the end loss.png and the consolidated model's path. A resumed run continues the same
tracker run: the ids are kept in RUN/trackers.json. Each one's library calls run on a thread of its own
(Worker), so a step never waits for a library or a server. The libraries are optional and imported only
here, only when asked for (mlflow alone takes seconds); their own environment variables apply
(WANDB_MODE, WANDB_DIR, WANDB_ENTITY, MLFLOW_TRACKING_URI, ...). Only rank 0 has trackers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from ...config import Project, sections_toml
from ...errors import GptError
from ...fsutil import atomic_write_json
from ...registry import FILE_REFERENCE, TRACKERS
from ...rundir import MLFLOW_DIR, TENSORBOARD_DIR, TRACKERS_FILE

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
# How long a tracker may take to start (import its library, reach its server, open its store) before the run
# goes on without it, with one warning. W&B's offline start, the slowest working one, takes ~15 s on a busy
# 2-core machine; a server that accepts and never answers held the run for 290 s.
START_TIMEOUT_S = 60.0
# MLflow's own bounds on each call to a tracking server, unless the user set them: its defaults (120 s and 7
# retries with backoff) let one unanswered call last many minutes.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
# Errors a library raises that are not Exceptions: SystemExit (W&B's import exits when it cannot set itself up).
LIBRARY_ERRORS = (Exception, SystemExit)


# --- which, and whether they can run ---------------------------------------------------------------------------


def requested(project: Project) -> list[str]:
    """The trackers asked for, each once: train.trackers, plus TensorBoard for train.tensorboard = true."""
    names = list(project.train.trackers) + ["tensorboard"] * project.train.tensorboard
    return list(dict.fromkeys(names))


def factory_of(project: Project, name: str) -> Callable:
    """The factory `name` stands for (imported the first time: a plugin that fails is one sentence)."""
    return TRACKERS.resolve(name, project.reference_dir, "train.trackers")


def title_of(name: str, factory: Any) -> str:
    """How messages name a tracker: its factory's `title`, else the name it was given (a file reference by
    the file's own name, not the absolute path the project stores)."""
    match = FILE_REFERENCE.match(name)
    shown = f"{Path(match.group('file')).name}:{match.group('attr')}" if match else name
    return str(getattr(factory, "title", shown))


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def check_trackers(project: Project) -> None:
    """Pre-flight: every tracker asked for can be found and has its package installed (one sentence if
    not, before anything slow starts), and the older `train.tensorboard = true` gets its migration note."""
    legacy = project.train.tensorboard and "tensorboard" not in project.train.trackers
    factories = {name: factory_of(project, name) for name in requested(project)}
    modules_of = {name: getattr(factory, "requires", None) for name, factory in factories.items()}  # optional
    missing = {name: factories[name] for name, module in modules_of.items() if module and not installed(module)}
    if missing:
        key = "train.tensorboard = true" if legacy and list(missing) == ["tensorboard"] else "train.trackers"
        modules = " and ".join(str(modules_of[name]) for name in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise GptError(f"{key} asks for {', '.join(missing)}, but {modules} {verb} not installed: "
                       f"pip install {install_arguments(missing)}.")
    if legacy and os.environ.get("RANK", "0") == "0":
        print('note: train.tensorboard = true is now written train.trackers = ["tensorboard"] (it still works).',
              file=sys.stderr)


def install_arguments(missing: dict[str, Any]) -> str:
    """pip's arguments for the missing trackers: gptcli's extras for the built-ins (one "gptcli[a,b]"), a
    plugin's `install` (else the module it requires) for the others."""
    extras = [name for name in missing if name in TRACKERS.builtins]
    others = [str(getattr(factory, "install", None) or factory.requires) for name, factory in missing.items()
              if name not in TRACKERS.builtins]
    return " ".join(([f'"gptcli[{",".join(extras)}]"'] if extras else []) + [f'"{other}"' for other in others])


# --- starting them, and gptcli's side of each ------------------------------------------------------------------


def start_trackers(project: Project, run_dir: Path, resume_step: int,
                   wrap: Callable[[Any], Any] = lambda tracker: tracker,
                   say: Callable[[str], None] = lambda line: None) -> list["TrackerFeed"]:
    """Rank 0: the project's trackers for a run that continues after `resume_step` (0: a fresh start). One
    that cannot start (no login, server unreachable) is a warning: the training runs without it. `wrap`:
    faults injected by tests; `say`: the phase line. MetricsWriter then sends each what it lacks."""
    names = requested(project)
    if not names:
        return []
    from ...inspect import inspect_parameters

    factories = {name: factory_of(project, name) for name in names}
    say(f"starting the trackers: {', '.join(title_of(name, f) for name, f in factories.items())}")
    config = {"parameters": inspect_parameters(project.model).total, **project.to_dict()}

    def maker(factory: Callable) -> Callable[[], Any]:  # each tracker's own factory, bound when it is made
        return lambda: wrap(factory(Path(run_dir), config, resume_step))

    started = [start_one(title_of(name, factory), maker(factory)) for name, factory in factories.items()]
    return [feed for feed in started if feed is not None]


def start_one(title: str, make: Callable[[], Any], timeout: float = START_TIMEOUT_S) -> Optional["TrackerFeed"]:
    """The tracker `make` makes and what it holds; None, with one warning, when either fails or takes longer
    than `timeout` seconds (a server that never answers): the start runs on a thread of its own, and a
    tracker it makes after the run went on without it is closed there. A tracker made but unable to say what
    it holds is closed."""
    outcome: dict[str, Any] = {}
    decided = threading.Lock()  # whether the run took the tracker or went on without it: decided once

    def start() -> None:
        try:
            tracker = make()
        except LIBRARY_ERRORS as error:  # a library's own failure, whatever its type
            outcome["error"] = error
            return
        try:
            held = tracker.last_step()
            if not isinstance(held, int) or isinstance(held, bool) or held < 0:
                raise TypeError(f"last_step() returned {held!r}, not a step number")
        except LIBRARY_ERRORS as error:
            outcome["error"] = error
            close_quietly(tracker)
            return
        with decided:
            outcome["feed"] = TrackerFeed(title, tracker, held)
            abandoned = outcome.get("late", False)
        if abandoned:
            close_quietly(tracker)

    thread = threading.Thread(target=start, name=f"starting {title}", daemon=True)
    thread.start()
    thread.join(timeout)
    with decided:
        outcome["late"] = "feed" not in outcome and "error" not in outcome
    if outcome["late"]:
        warn(title, TimeoutError(f"no answer within {timeout:.0f} s"), "could not start")
        return None
    if "error" in outcome:
        warn(title, outcome["error"], "could not start")
        return None
    return outcome["feed"]


def close_quietly(tracker: Any) -> None:
    try:
        tracker.close()
    except LIBRARY_ERRORS:
        pass


class TrackerFeed:
    """gptcli's side of one tracker: each step goes to it once, the steps above what it held when it
    started (`held`); the optional calls go only to a tracker that has them."""

    def __init__(self, title: str, tracker: Any, held: int):
        self.title, self.tracker, self.held = title, tracker, held

    def log(self, record: dict) -> None:
        if record["step"] > self.held:
            self.tracker.log(record["step"], scalars(record))

    def text(self, step: int, key: str, text: str) -> None:
        if step > self.held and hasattr(self.tracker, "text"):
            self.tracker.text(step, key, text)

    def flush(self) -> None:
        if hasattr(self.tracker, "flush"):
            self.tracker.flush()

    def end(self, step: int, status: str, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if hasattr(self.tracker, "end"):
            self.tracker.end(step, status, plot, model_dir)

    def close(self) -> None:
        self.tracker.close()


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a step's record by name, whatever keys it holds (the step itself left out, and
    those with no value); a nested table's numbers are named "table/key"."""
    found = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            found[name] = float(value)
    return found


def warn(name: str, error: BaseException, what: str = "failed", then: str = "the run goes on without it") -> None:
    """One line on stderr: the tracker, what happened, the first line of the library's error."""
    if isinstance(error, SystemExit):  # its text is the exit code
        error = SystemExit(f"it called sys.exit({error.code!r})")
    lines = str(error).strip().splitlines() or [""]
    detail = f"{type(error).__name__}: {lines[0][:300]}".rstrip(": ")
    print(f"warning: {name} {what} ({detail}); {then}.", file=sys.stderr, flush=True)


# --- what the built-ins share ----------------------------------------------------------------------------------


def read_ids(run_dir: Path) -> dict:
    """RUN/trackers.json: what each built-in keeps between a run and its resumption (run ids). A damaged file
    is said once, naming it: the trackers then start new runs instead of continuing theirs."""
    path = Path(run_dir) / TRACKERS_FILE
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:
        damaged(path, getattr(error, "strerror", None) or "it is not JSON")
        return {}
    if not isinstance(ids, dict):
        damaged(path, "it holds no JSON object")
        return {}
    return ids


_said_damaged: set[Path] = set()


def damaged(path: Path, why: str) -> None:
    if path not in _said_damaged:
        _said_damaged.add(path)
        print(f"warning: {path} cannot be read ({why}); the trackers start new runs instead of continuing the ones "
              "it named, and it is written anew.", file=sys.stderr, flush=True)


def stored(run_dir: Path, tracker: str) -> dict:
    value = read_ids(run_dir).get(tracker)
    return value if isinstance(value, dict) else {}


def remember(run_dir: Path, tracker: str, value: dict) -> None:
    ids = read_ids(run_dir)
    if ids.get(tracker) != value:
        atomic_write_json(Path(run_dir) / TRACKERS_FILE, {**ids, tracker: value})


def tracker_project(config: dict, environment_variable: str) -> str:
    """W&B's project, MLflow's experiment: train.tracker_project, else the library's variable, else
    project.name."""
    return (config["train"]["tracker_project"] or os.environ.get(environment_variable)
            or config["project"]["name"])


def run_name(config: dict, run_dir: Path, environment_variable: Optional[str] = None) -> str:
    return (config["train"]["tracker_run_name"] or (environment_variable and os.environ.get(environment_variable))
            or Path(run_dir).resolve().name)


def config_text(config: dict) -> str:
    """The run's config as TOML, headed by the parameter count."""
    return f"# parameters: {config['parameters']:,}\n{sections_toml(config)}"


# --- TensorBoard -----------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Events in RUN/tensorboard, scalars as "train/KEY" in float64 (TensorBoard's default float32 would
    round the values metrics.jsonl holds). The summaries are built and written on the worker thread.

    What it holds: every step up to the last one its writer flushed when gptcli asked (before each
    checkpoint, and at the end), which RUN/trackers.json records once the flush is done. A resumed writer
    purges every event after that step (or after resume_step, if lower), so what the writer's own thread
    flushed after it, or a killed run logged past the checkpoint, is not shown twice."""

    title = "TensorBoard"
    requires = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import scalar

        self.summary, self.scalar, self.run_dir = Summary, scalar, run_dir
        self.held = min(int(stored(run_dir, "tensorboard").get("flushed", 0)), resume_step)
        self.logged = self.held
        # The writer's own thread flushes the file every TENSORBOARD_FLUSH_S; its queue is long enough that
        # the worker never waits for it (torch's 10 did, for about 1 ms a step).
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=self.held + 1,
                                    max_queue=TENSORBOARD_QUEUE, flush_secs=TENSORBOARD_FLUSH_S)
        self.writer.add_text("config", indented(config_text(config)), resume_step)
        self.calls = Worker("TensorBoard")

    def last_step(self) -> int:
        return self.held

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.logged = step
        self.calls.submit(self.write_scalars, metrics, step)

    def write_scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding every value of the step (add_scalar writes one event per value: twice the cost)."""
        summaries = [self.scalar(f"train/{key}", value, new_style=True, double_precision=True) for key, value in
                     values.items()]
        file_writer = self.writer.file_writer
        assert file_writer is not None, "SummaryWriter opens its file writer when it is made"
        file_writer.add_summary(self.summary(value=[v for s in summaries for v in s.value]), step)

    def text(self, step: int, key: str, text: str) -> None:
        self.calls.submit(self.writer.add_text, key, indented(text), step)

    def end(self, step: int, status: str, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if plot is not None:
            self.calls.submit(self.write_image, "loss_curve", plot, step)
        if model_dir is not None:
            self.calls.submit(self.writer.add_text, "model_dir", str(model_dir), step)

    def write_image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(tag, matplotlib.image.imread(path), step, dataformats="HWC")

    def flush(self) -> None:
        self.calls.submit(self.flushed, self.logged)
        self.calls.wait(FLUSH_TIMEOUT_S)

    def flushed(self, step: int) -> None:
        """On the worker, after the events of `step` and those before it: write them out, then say so."""
        self.writer.flush()
        remember(self.run_dir, "tensorboard", {"flushed": step})

    def close(self) -> None:
        try:
            self.calls.finish(CLOSE_TIMEOUT_S)
        finally:
            self.writer.close()
        remember(self.run_dir, "tensorboard", {"flushed": self.logged})


def indented(text: str) -> str:
    """Text shown as written: TensorBoard renders text as Markdown, where 4 spaces make a code block."""
    return "\n".join(f"    {line}" for line in text.splitlines())


# --- Weights & Biases ------------------------------------------------------------------------------------------


class WandbTracker:
    """A W&B run in RUN/wandb (WANDB_DIR when set), online or offline as WANDB_MODE says.

    What it holds: offline, the steps in the transaction logs of the run's earlier segments (each start of
    the run writes a new `offline-run-*` directory; W&B's process writes its file every 15 s, so a killed
    run's last steps may be missing, and gptcli sends them again); online, the steps before the one the
    server says the resumed run continues from. W&B cannot drop steps: those above resume_step that it
    holds keep the killed run's values (the same, as resume is exact, but for the clock's tokens_per_s and
    elapsed)."""

    title = "W&B"
    requires = "wandb"

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and 30-line summary: in its own logs (RUN/wandb)
        import wandb

        from .chatter import route_library_loggers

        route_library_loggers()
        check_wandb_mode(wandb)
        self.wandb = wandb
        run_id = stored(run_dir, "wandb").get("id")
        self.run = wandb.init(id=run_id, resume="allow" if run_id else None, config=config, allow_val_change=True,
                              project=tracker_project(config, "WANDB_PROJECT"),
                              name=run_name(config, run_dir, "WANDB_NAME"),
                              dir=None if os.environ.get("WANDB_DIR") else str(run_dir))
        remember(run_dir, "wandb", {"id": self.run.id})
        self.held = self.steps_held() if run_id else 0
        self.exit_code = 1  # until end() says the run finished
        # run.log waits for W&B's own thread to hand the data to its process (about 1-2 ms a step on a
        # busy 2-core machine, bench/trackers.py): the worker waits instead of the step.
        self.calls = Worker(f"W&B ({self.run.id})")

    def steps_held(self) -> int:
        if self.run.offline:
            from .wandb_log import last_history_step, offline_logs

            settings = self.run.settings
            return last_history_step(offline_logs(Path(settings.wandb_dir), self.run.id, Path(settings.sync_file)))
        return max(self.run.step - 1, 0)  # the server's: the step the resumed run continues from, less one

    def last_step(self) -> int:
        return self.held

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # Committed at once: W&B would otherwise hold the step's row until the next step.
        self.calls.submit(self.run.log, metrics, step, True)

    def text(self, step: int, key: str, text: str) -> None:  # before the step's record, which commits the row
        table = self.wandb.Table(columns=["step", "text"], data=[[step, text]])
        self.calls.submit(self.run.log, {key: table}, step, False)

    def end(self, step: int, status: str, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if plot is not None:  # the last step's row is committed: the plot goes into the summary
            self.calls.submit(self.run.summary.__setitem__, "loss_curve", self.wandb.Image(str(plot)))
        if model_dir is not None:
            self.calls.submit(self.run.summary.__setitem__, "model_dir", str(model_dir))
        self.exit_code = 0 if status == "finished" else 1

    def flush(self) -> None:
        """The calls queued are handed to W&B (which writes its file on its own schedule)."""
        self.calls.wait(FLUSH_TIMEOUT_S)

    def close(self) -> None:
        try:
            self.calls.finish(CLOSE_TIMEOUT_S)
        finally:
            self.run.finish(exit_code=self.exit_code)


# --- MLflow ----------------------------------------------------------------------------------------------------


class MlflowTracker:
    """An MLflow run in MLFLOW_TRACKING_URI's store, else in RUN/mlflow/mlflow.db (SQLite, artifacts beside
    it). Calls run on a worker thread, so a slow server never holds up a step.

    What it holds: the steps of the run's metrics in the store (its highest). MLflow cannot delete a
    metric's points: those above resume_step keep the killed run's values (the same, as resume is exact,
    but for the clock's tokens_per_s and elapsed)."""

    title = "MLflow"
    requires = "mlflow"

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)  # read by MLflow when it is imported
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from .chatter import route_library_loggers

        route_library_loggers()  # MLflow set up its own stderr handler when it was imported
        self.metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = Path(run_dir).resolve() / MLFLOW_DIR
        if not uri:
            local.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{local / 'mlflow.db'}"
        check_sqlite_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        saved = stored(run_dir, "mlflow")
        self.held = 0
        if saved.get("tracking_uri") == uri and self.usable(saved.get("run_id")):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            held = self.client.get_run(self.run_id).data.to_proto().metrics  # each key's latest (highest) step
            self.held = max((metric.step for metric in held), default=0)
        else:
            experiment = self.experiment(tracker_project(config, "MLFLOW_EXPERIMENT_NAME"),
                                         None if os.environ.get("MLFLOW_TRACKING_URI") else local / "artifacts")
            self.run_id = self.client.create_run(experiment, run_name=run_name(config, run_dir)).info.run_id
        remember(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        self.log_config(config)
        self.state = "FAILED"  # until end() says how the run ended
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

    def log_config(self, config: dict) -> None:
        """The project as parameters ("train.lr"); a resumed run adds the new keys only (MLflow refuses to
        change a parameter's value), and its config.resolved.toml artifact is the latest one."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params
        params = [Param(key, value) for key, value in flat_params(config) if key not in held]
        for first in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + MLFLOW_PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, config_text(config), "config.resolved.toml")

    def last_step(self) -> int:
        return self.held

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.calls.submit("metrics", [self.metric(key, value, now, step) for key, value in metrics.items()])

    def text(self, step: int, key: str, text: str) -> None:
        self.calls.submit(self.client.log_text, self.run_id, text, f"{key}s/step_{step:08d}.txt")

    def end(self, step: int, status: str, plot: Optional[Path], model_dir: Optional[Path]) -> None:
        if plot is not None:
            self.calls.submit(self.client.log_artifact, self.run_id, str(plot))
        if model_dir is not None:
            self.calls.submit(self.client.set_tag, self.run_id, "model_dir", str(model_dir))
        self.state = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")

    def flush(self) -> None:
        self.calls.wait(FLUSH_TIMEOUT_S)

    def close(self) -> None:
        if not self.calls.failed:
            self.calls.submit(self.client.set_terminated, self.run_id, self.state)
        self.calls.finish(CLOSE_TIMEOUT_S)

    def log_metrics(self, metrics: list) -> None:
        for first in range(0, len(metrics), MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + MLFLOW_METRICS_PER_BATCH])


def check_sqlite_store(uri: str) -> None:
    """An SQLite store that cannot be opened, found at once: MLflow retries it for 105 s (15 times, with
    backoff), a line of warning each time."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = uri[len("sqlite:///"):]
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as store:
            store.execute("select 1 from sqlite_master limit 1")
    except sqlite3.Error as error:
        raise RuntimeError(f"cannot open the SQLite store {path}: {error}") from None


def check_wandb_mode(wandb: Any) -> None:
    """WANDB_MODE must be one W&B knows: its settings refuse anything else with a validation error that does
    not name the variable."""
    mode = os.environ.get("WANDB_MODE")
    try:
        allowed = typing.get_args(wandb.Settings.model_fields["mode"].annotation)
    except (AttributeError, KeyError):  # another W&B version: it checks for itself
        return
    if mode is not None and allowed and mode not in allowed:
        raise ValueError(f"WANDB_MODE={mode!r} is not one of {', '.join(allowed)}")


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
                        function = self.log_metrics if call == "metrics" else call
                        assert function is not None, "only a worker given log_metrics is sent metrics"
                        function(*args)
                    except LIBRARY_ERRORS as error:  # SystemExit too: it would end this thread in silence
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
    merged: list[tuple[Any, tuple]] = []  # (a callable, "metrics", "wake" or None, its arguments)
    for item in items:
        if item is None:
            merged.append((None, ()))
        elif item[0] == "metrics" and merged and merged[-1][0] == "metrics":
            merged[-1][1][0].extend(item[1][0])
        else:
            merged.append((item[0], (list(item[1][0]),) if item[0] == "metrics" else item[1]))
    return merged
