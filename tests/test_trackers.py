"""`[train] trackers`: the tracker protocol (a factory, last_step, log, close) and the built-ins, TensorBoard,
W&B (offline) and MLflow (local stores), read back with each library's own reader; a plugin's tracker; after
a kill -9 at any moment and a resume, every tracker holds each step of metrics.jsonl exactly once; a tracker
that fails costs a warning, never the run.

The fast tests drive the trackers in-process on records; the slow ones train (tests at the end)."""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from pathlib import Path

import pytest

from conftest import project_file
from gptcli import rundir
from gptcli.config import ConfigError, apply_overrides, load_project, project_from_dict
from gptcli.errors import GptError
from gptcli.train import preflight
from gptcli.train.observing import trackers
from gptcli.train.observing.metrics import MetricsWriter, truncate_metrics
from gptcli.train.observing.trackers import TrackerFeed, scalars, start_trackers
from gptcli.train.state import checkpoint


def project(*overrides: str, run_dir: Path = Path("runs/x"), source: Path | None = None):
    """The nano project with `overrides`; with `source`, as if read from that file (its directory is where
    "file.py:attr" references are found)."""
    settings = ['model.preset="nano"', f'project.out_dir="{run_dir}"', *overrides]
    if source is None:
        return load_project(None, settings)
    return project_from_dict(apply_overrides({}, settings), source=str(source))


def records(steps) -> list[dict]:
    """Step records as the loop writes them, with an evaluation every 4 steps and a task score that no
    tracker knows by name."""
    made = []
    for step in steps:
        record = {"step": step, "loss": 10.0 / step + 1e-12 * step, "lr": 3e-3 * step / 7, "grad_norm": None,
                  "tokens": 512 * step, "tokens_per_s": 1234.5 + step, "mfu": None, "elapsed": 0.1 * step,
                  "skipped_steps": 0}
        if step % 4 == 0:
            record |= {"eval_loss": 5.0 + 1 / step, "eval_perplexity": math.exp(5.0 + 1 / step),
                       "tasks": {"hellaswag": {"acc": 0.25 + step / 1000}}}
        made.append(record)
    return made


def expected(steps) -> dict[str, dict[int, float]]:
    """key → {step: value} of every number those records hold."""
    table: dict[str, dict[int, float]] = {}
    for record in records(steps):
        for key, value in scalars(record).items():
            table.setdefault(key, {})[record["step"]] = value
    return table


def log_run(run_dir: Path, proj, steps, start: int = 0, end: bool = True) -> None:
    """What the loop does on rank 0: cut metrics.jsonl back to `start`, start the trackers after it (they
    get the steps of metrics.jsonl they lack), write the records (a sample at step 4), and end the run with
    loss.png and a model dir, or stop without an end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    truncate_metrics(run_dir, start)
    writer = MetricsWriter(run_dir, start_trackers(proj, run_dir, start))
    for record in records(steps):
        if record["step"] == 4:
            writer.sample(4, "In my opinion, a sample")
        writer.write(record)
    if end:
        from gptcli.train.observing.metrics import plot_losses

        plot_losses(run_dir)
        writer.end(steps[-1], 0, run_dir / "model")
    writer.close()


# --- choosing trackers -------------------------------------------------------------------------------------------


def test_scalars_are_every_number_of_a_record_nested_tables_by_path():
    record = {"step": 8, "loss": 2.5, "grad_norm": None, "tokens": 4096, "flag": True, "note": "text",
              "tasks": {"hellaswag": {"acc": 0.3, "acc_norm": 0.31}, "lambada": {"ppl": 40.0}}}
    assert scalars(record) == {"loss": 2.5, "tokens": 4096, "tasks/hellaswag/acc": 0.3,
                               "tasks/hellaswag/acc_norm": 0.31, "tasks/lambada/ppl": 40.0}


def test_an_unknown_tracker_is_a_config_error_naming_what_there_is_and_the_nearest(tmp_path):
    with pytest.raises(ConfigError) as error:
        project('train.trackers=["tensorboard", "wandbb"]')
    message = str(error.value)  # a plugin package installed by another test adds "; installed: ..." to the list
    assert message.startswith('train.trackers names "wandbb", which is not a tracker (built in: tensorboard, wandb, '
                              'mlflow')
    assert message.endswith('or "package.module:attr", or "file.py:attr" beside the project file) (did you mean '
                            '"wandb"?).')
    with pytest.raises(ConfigError, match=f'"mine.py:start" names {tmp_path / "mine.py"}, which is not a file'):
        project('train.trackers=["mine.py:start"]', source=tmp_path / "run.toml")


def test_train_tensorboard_true_still_asks_for_tensorboard_with_a_migration_note(capsys):
    old = project("train.tensorboard=true")
    assert trackers.requested(old) == ["tensorboard"]
    trackers.check_trackers(old)
    assert 'train.tensorboard = true is now written train.trackers = ["tensorboard"]' in capsys.readouterr().err
    both = project("train.tensorboard=true", 'train.trackers=["mlflow", "tensorboard", "mlflow"]')
    assert trackers.requested(both) == ["mlflow", "tensorboard"]


def test_a_tracker_that_is_not_installed_is_one_sentence_before_anything_slow(monkeypatch):
    monkeypatch.setattr(trackers.WandbTracker, "requires", "no_such_module_for_gptcli_tests")
    monkeypatch.setattr(trackers.MlflowTracker, "requires", "no_such_module_for_gptcli_tests_either")
    proj = project('train.trackers=["tensorboard", "wandb", "mlflow"]')

    def measure_cpu():  # the first slow thing `gpt train` does
        raise AssertionError("the CPU was measured before the missing package was named")

    with pytest.raises(GptError) as error:
        preflight.preflight(proj, "cpu", "never", measure_cpu=measure_cpu)
    assert str(error.value) == ('train.trackers asks for wandb, mlflow, but no_such_module_for_gptcli_tests and '
                                'no_such_module_for_gptcli_tests_either are not installed: pip install '
                                '"gptcli[wandb,mlflow]".')


def imports_in(node, inside_function: bool = False):
    """(import node, whether it sits inside a function) for every import under `node`."""
    import ast

    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, inside_function
        yield from imports_in(child, inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_the_tracker_libraries_are_imported_only_inside_the_trackers_functions():
    """So `gpt` starts, and trains without trackers, without paying for them (mlflow alone takes seconds)."""
    import ast

    libraries = ("wandb", "mlflow", "tensorboard", "torch.utils.tensorboard")
    where: dict[str, set] = {}
    for path in Path(trackers.__file__).parents[1].rglob("*.py"):
        for node, inside in imports_in(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.startswith(libraries) and not getattr(node, "level", 0):
                    where.setdefault(path.name, set()).add((name, inside))
    assert set(where) == {"trackers.py", "wandb_log.py"}  # wandb_log.py: W&B's record format, for W&B
    assert {name for name, _ in where["trackers.py"]} >= {"wandb", "mlflow.tracking", "torch.utils.tensorboard"}
    assert all(inside for found in where.values() for _, inside in found), where


# --- failures ----------------------------------------------------------------------------------------------------


class Recording:
    """A tracker of the protocol that keeps what it is given in memory; it already holds `held` steps."""

    def __init__(self, held: int = 0, fail_at: int = 0):
        self.fail_at, self.steps, self.closed = fail_at, list(range(1, held + 1)), 0

    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0

    def log(self, step, metrics):
        if step == self.fail_at:
            raise ConnectionError("server went away\nwith a second line")
        self.steps.append(step)

    def close(self):
        self.closed += 1


def test_a_tracker_that_raises_is_switched_off_with_one_warning_and_the_others_go_on(tmp_path, capsys):
    failing, working = Recording(fail_at=3), Recording()
    writer = MetricsWriter(tmp_path, [TrackerFeed("MLflow", failing, 0), TrackerFeed("W&B", working, 0)])
    for record in records(range(1, 7)):
        writer.write(record)
    writer.end(6, 0, None)
    writer.close()
    assert capsys.readouterr().err == ("warning: MLflow failed (ConnectionError: server went away); the run goes on "
                                       "without it.\n")  # once, its first line only
    assert failing.steps == [1, 2] and failing.closed == 1
    assert working.steps == [1, 2, 3, 4, 5, 6] and working.closed == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("held", [0, 2, 5, 7])
def test_a_tracker_gets_the_steps_of_metrics_jsonl_it_lacks_then_each_new_one_once(tmp_path, held):
    """A run killed after step 7 resumes from its checkpoint of step 5: a tracker that holds nothing, lost
    its last steps (2), holds up to the checkpoint (5), or holds steps it could not drop (7) ends holding
    steps 1-10 once each, with metrics.jsonl's numbers."""
    killed = "".join(json.dumps(record) + "\n" for record in records(range(1, 8)))  # what the killed run wrote
    (tmp_path / "metrics.jsonl").write_text(killed)
    truncate_metrics(tmp_path, 5)
    tracker = Recording(held)
    writer = MetricsWriter(tmp_path, [TrackerFeed("mine", tracker, tracker.last_step())])
    for record in records(range(6, 11)):
        writer.write(record)
    writer.close()
    assert tracker.steps == list(range(1, 11))


def test_a_tracker_with_the_optional_calls_gets_them_and_one_without_them_is_not_asked(tmp_path):
    class Full(Recording):
        def __init__(self):
            super().__init__()
            self.calls = []

        def text(self, step, key, text):
            self.calls.append(("text", step, key))

        def flush(self):
            self.calls.append(("flush",))

        def end(self, step, status, plot, model_dir):
            self.calls.append(("end", step, status, model_dir))

    full, bare = Full(), Recording()
    writer = MetricsWriter(tmp_path, [TrackerFeed("full", full, 0), TrackerFeed("bare", bare, 0)])
    writer.write(records([1])[0])
    writer.sample(1, "a sample")
    writer.flush()
    writer.end(1, 143, tmp_path / "model")
    writer.close()
    assert full.calls == [("text", 1, "sample"), ("flush",), ("end", 1, "stopped", (tmp_path / "model").resolve())]
    assert bare.steps == full.steps == [1] and bare.closed == full.closed == 1


def test_the_worker_runs_calls_in_order_merges_queued_metrics_and_reports_an_error_on_the_next_call():
    import threading

    sent, gate = [], threading.Event()
    worker = trackers.Worker("test", lambda metrics: sent.append(list(metrics)))
    worker.submit(gate.wait)  # a slow server: the metrics of three steps queue up behind this call
    for step in (1, 2, 3):
        worker.submit("metrics", [f"loss@{step}", f"lr@{step}"])
    worker.submit(sent.append, "text")
    gate.set()
    worker.wait(10)
    assert sent == [["loss@1", "lr@1", "loss@2", "lr@2", "loss@3", "lr@3"], "text"]  # one call for the three

    def refused(*_):
        raise ConnectionRefusedError("server down")

    worker.submit(refused)
    worker.submit(sent.append, "dropped")
    worker.wait(10)  # woken even after the error
    with pytest.raises(ConnectionRefusedError, match="server down"):
        worker.submit(sent.append, "after")
    assert sent[-1] == "text"
    with pytest.raises(ConnectionRefusedError):
        worker.finish(10)


def test_the_worker_gives_up_on_calls_still_queued_after_the_timeout():
    import threading

    hung = threading.Event()
    worker = trackers.Worker("test", lambda metrics: None)
    worker.submit(hung.wait)
    with pytest.raises(TimeoutError, match="calls still queued after 0 s"):
        worker.finish(0.2)
    hung.set()


PLUGIN_FILE = """\
def no_login(run_dir, config, resume_step):
    raise PermissionError("api_key not configured (no-tty)")

no_login.title = "W&B"

class Counting:
    def __init__(self, run_dir, config, resume_step):
        self.config, self.resume_step, self.steps = config, resume_step, []
    def last_step(self):
        return 3
    def log(self, step, metrics):
        self.steps.append(step)
    def close(self):
        pass

class Vague(Counting):
    closed = False
    def last_step(self):
        return None
    def close(self):
        Vague.closed = True
"""


def test_a_tracker_that_cannot_start_is_a_warning_and_the_others_start(tmp_path, capsys):
    """Trackers named "file.py:attr", beside the project file: a factory that raises, or a tracker that cannot
    say what it holds (it is closed), costs a warning naming its title; the other gets the run's config and
    the step the run resumes from."""
    (tmp_path / "mine.py").write_text(PLUGIN_FILE)
    named = ["mine.py:no_login", "mine.py:Counting", "mine.py:Vague"]
    proj = project(f"train.trackers={json.dumps(named)}", source=tmp_path / "run.toml")
    [started] = start_trackers(proj, tmp_path, 5)
    assert started.title == "mine.py:Counting" and started.held == 3
    assert started.tracker.resume_step == 5 and started.tracker.config["parameters"] == 3_320_640
    # the resolved project holds each file reference made absolute, beside the project file
    assert started.tracker.config["train"]["trackers"] == [str(tmp_path / name) for name in named]
    assert capsys.readouterr().err == (
        "warning: W&B could not start (PermissionError: api_key not configured (no-tty)); the run goes on without "
        "it.\nwarning: mine.py:Vague could not start (TypeError: last_step() returned None, not a step number); "
        "the run goes on without it.\n")
    assert sys.modules[type(started.tracker).__module__].Vague.closed


def test_the_example_plugins_tracker_drops_what_a_killed_run_logged_after_the_checkpoint(tmp_path):
    """examples/plugins' tracker as "file.py:attr": stopped after step 8, resumed from step 5, its file holds
    steps 1-10 once each with the records' numbers; a line a kill cut short is not counted as held."""
    from conftest import REPO

    plugin = REPO / "examples" / "plugins" / "gptcli_example_plugins" / "tracker.py"
    (tmp_path / "mirror_tracker.py").write_text(plugin.read_text())
    proj = project('train.trackers=["mirror_tracker.py:start"]', run_dir=tmp_path / "run",
                   source=tmp_path / "run.toml")
    run_dir = tmp_path / "run"
    log_run(run_dir, proj, list(range(1, 9)), end=False)
    with open(run_dir / "mirror.jsonl", "a") as handle:
        handle.write('{"step": 9, "lo')  # torn by a kill
    log_run(run_dir, proj, list(range(6, 11)), start=5, end=False)
    mirrored = [json.loads(line) for line in (run_dir / "mirror.jsonl").read_text().splitlines()]
    assert [record["step"] for record in mirrored] == list(range(1, 11))
    want = expected(range(1, 11))
    assert {key: {r["step"]: r[key] for r in mirrored if key in r} for key in want} == want


def test_restart_removes_the_tracker_run_ids_and_keeps_the_trackers_own_stores(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 10.0}\n')
    (tmp_path / rundir.TRACKERS_FILE).write_text('{"wandb": {"id": "abc"}}')
    (tmp_path / "wandb" / "offline-run-1-abc").mkdir(parents=True)
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").write_bytes(b"db")
    assert rundir.TRACKERS_FILE in {p.name for p in rundir.run_files(tmp_path)}
    checkpoint.agree_on_resume(tmp_path, "auto", restart=True, rank=0)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "mlflow", "mlflow/mlflow.db", "wandb", "wandb/offline-run-1-abc"]


# --- each tracker on records ------------------------------------------------------------------------------------


def test_tensorboard_holds_every_number_in_float64_the_config_the_sample_and_the_plot(tmp_path):
    pytest.importorskip("tensorboard")
    from tracker_readers import tensorboard_events

    proj = project('train.trackers=["tensorboard"]', run_dir=tmp_path)
    log_run(tmp_path, proj, list(range(1, 9)), end=False)  # killed after step 8 ...
    log_run(tmp_path, proj, list(range(6, 11)), start=5)  # ... and resumed from step 5: each step once
    events = tensorboard_events(tmp_path)
    want = {key: list(values.items()) for key, values in expected(range(1, 11)).items()}
    assert {tag.removeprefix("train/"): points for tag, points in events.scalars.items()} == want
    config = events.texts["config"][5]  # written when the resumed run started
    assert "parameters: 3,320,640" in config and 'trackers = ["tensorboard"]' in config
    assert events.texts["sample"] == {4: "In my opinion, a sample"}
    assert events.texts["model_dir"] == {10: str((tmp_path / "model").resolve())}
    assert events.images == {"loss_curve": [10]}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for variable in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # pytest captures the output W&B would otherwise wrap
    for variable, name in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                           ("WANDB_DATA_DIR", "data")):  # not the user's home
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / name))


def held_by_segments(segments, keys) -> dict[str, dict[int, float]]:
    """key → {step: value} of what W&B's offline segments hold together; each step in one segment only."""
    steps = [step for segment in segments for step, row in segment.history.items() if "loss" in row]
    assert len(steps) == len(set(steps)), steps
    return {key: {step: row[key] for segment in segments for step, row in segment.history.items() if key in row}
            for key in keys}


def test_wandb_offline_holds_every_number_the_config_and_a_resume_continues_the_same_run(tmp_path, wandb_offline):
    import wandb

    from tracker_readers import wandb_segments

    run_dir = tmp_path / "run"
    proj = project('train.trackers=["wandb"]', 'train.tracker_project="shakespeare"', run_dir=run_dir)
    log_run(run_dir, proj, list(range(1, 7)), end=False)  # stopped after step 6 ...
    log_run(run_dir, proj, list(range(5, 11)), start=4)  # ... and resumed from step 4: W&B holds 1-6 already
    wandb.teardown()  # W&B's process writes the last records of its file as it shuts down
    first, second = wandb_segments(run_dir / "wandb")
    assert first.run_id == second.run_id == json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    assert (first.project, first.name) == ("shakespeare", "run")
    assert first.config["parameters"] == 3_320_640 and first.config["train"]["trackers"] == ["wandb"]
    want = expected(range(1, 11))
    assert held_by_segments([first, second], want) == want
    assert sorted(second.history) == [7, 8, 9, 10]
    assert first.history[4]["sample/_type"] == "table-file"
    assert second.summary["loss_curve"]["_type"] == "image-file"
    assert second.summary["model_dir"] == str((run_dir / "model").resolve())


@pytest.mark.slow  # two W&B runs: seconds
def test_wandb_offline_sends_again_the_steps_its_file_lost(tmp_path, wandb_offline):
    """W&B's process writes its file every 15 s: a kill -9 loses what it had not written (the steps held
    1-3 and 11-30 while metrics.jsonl had 1-30). Here the file of a run stopped after step 8 is cut back
    mid-record to what it held after step 3; the run resumes from step 6 and sends 4-6 from metrics.jsonl."""
    import wandb

    from tracker_readers import wandb_records, wandb_segments

    run_dir = tmp_path / "run"
    proj = project('train.trackers=["wandb"]', run_dir=run_dir)
    log_run(run_dir, proj, list(range(1, 9)), end=False)
    wandb.teardown()
    [log] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data, kept = log.read_bytes(), 0
    for size in range(len(data) - 1, 7, -997):  # the longest prefix whose last history step is 3
        log.write_bytes(data[:size])
        steps = [r.history.step.num for r in wandb_records(log) if r.WhichOneof("record_type") == "history"]
        if steps and max(steps) == 3:
            kept = size
            break
    assert kept, "no cut of the file holds steps 1-3"
    log_run(run_dir, proj, list(range(7, 11)), start=6)
    wandb.teardown()
    want = expected(range(1, 11))
    assert held_by_segments(wandb_segments(run_dir / "wandb"), want) == want


def write_wandb_log(path: Path, payloads: list[bytes]) -> None:
    """A transaction log in W&B's framing (tracker_readers' constants): records split into chunks at the
    32 KiB block boundaries, the last bytes of a block too short for a chunk header padded."""
    from tracker_readers import CHUNK_HEADER, FIRST, FULL, LAST, MIDDLE, WANDB_BLOCK, WANDB_HEADER

    out = bytearray(WANDB_HEADER + b"\xe1\xbe\x00")
    for rest in payloads:
        first = True
        while first or rest:
            left = WANDB_BLOCK - len(out) % WANDB_BLOCK
            if left < CHUNK_HEADER:
                out += bytes(left)
                continue
            piece, rest = rest[:left - CHUNK_HEADER], rest[left - CHUNK_HEADER:]
            kind = (FULL if not rest else FIRST) if first else (LAST if not rest else MIDDLE)
            out += struct.pack("<IHB", 0, len(piece), kind) + piece
            first = False
    path.write_bytes(bytes(out))


def test_what_a_wandb_log_holds_is_read_from_its_end_as_a_whole_reading_finds_it(tmp_path):
    """Its last history step, read from the last blocks (further back when they hold none: here a 300 KB
    record after it), equals that of reading every record, for the whole file and for files a kill cut."""
    wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    from gptcli.train.observing.wandb_log import last_history_step
    from tracker_readers import wandb_records

    def history(step: int, width: int) -> bytes:
        record = wandb_proto.Record()
        record.history.step.num = step
        record.history.item.add(key="loss", value_json="0." + "7" * width)
        return record.SerializeToString()

    files = wandb_proto.Record()
    files.files.files.add(path="x" * 300_000)
    draw = random.Random(0)
    path = tmp_path / "run-abc.wandb"
    write_wandb_log(path, [history(step, draw.randrange(10, 90_000)) for step in range(1, 40)]
                    + [files.SerializeToString()])
    data = path.read_bytes()
    for size in [len(data), *sorted(draw.sample(range(8, len(data)), 25))]:
        path.write_bytes(data[:size])
        steps = [r.history.step.num for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]
        assert last_history_step([path]) == max(steps, default=0), size
    path.write_bytes(data)
    assert last_history_step([path]) == 39


def test_mlflow_holds_every_number_once_the_config_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from tracker_readers import mlflow_runs

    for key in trackers.MLFLOW_HTTP_DEFAULTS:  # the tracker sets MLflow's HTTP bounds; monkeypatch undoes them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    # A file store: the quickest local store to open (a new SQLite store builds its tables first, which takes
    # seconds); the training test below uses SQLite.
    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run_dir = tmp_path / "run"
    proj = project('train.trackers=["mlflow"]', 'train.tracker_run_name="first try"', run_dir=run_dir)
    log_run(run_dir, proj, list(range(1, 7)), end=False)  # stopped after step 6 ...
    log_run(run_dir, proj, list(range(5, 11)), start=4)  # ... and resumed from step 4: MLflow holds 1-6 already
    [run] = mlflow_runs(uri, "gpt")
    assert run["name"] == "first try" and run["status"] == "FINISHED"
    assert {key: dict(points) for key, points in run["metrics"].items()} == expected(range(1, 11))
    assert all(len(points) == len(dict(points)) for points in run["metrics"].values())  # each step once
    assert run["params"]["parameters"] == "3320640" and run["params"]["train.lr"] == "0.003"
    assert run["params"]["train.trackers"] == '["mlflow"]'
    assert {"config.resolved.toml", "loss.png", "samples/step_00000004.txt"} <= set(run["artifacts"])
    assert run["tags"]["model_dir"] == str((run_dir / "model").resolve())


# --- training with trackers --------------------------------------------------------------------------------------

# conftest's NANO_RUN (8 steps, checkpoints at 3, 6 and 8, an evaluation every 4 steps), named, with a sample
# every 4 steps: its losses are those of conftest's reference run.
TRAINING = ('project.name="trackers"', "train.sample_every=4", "train.sample_tokens=8")


def train(directory: Path, *args: str, env: dict | None = None, fault: str = ""):
    """`gpt train` of directory/run.toml; W&B offline (its process writes its file every 15 s, its default:
    a kill loses what it had not written) and at home in the directory."""
    import conftest

    environment = {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(directory / "wandb-home" / "cache"),
                   "WANDB_CONFIG_DIR": str(directory / "wandb-home" / "config"),
                   "WANDB_DATA_DIR": str(directory / "wandb-home" / "data"), **(env or {})}
    return conftest.train(directory / "run.toml", *args, cwd=directory, env=environment, fault=fault)


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    """key → {step: value} of every number metrics.jsonl holds."""
    table: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in scalars(record).items():
            table.setdefault(key, {})[record["step"]] = value
    return table


# The second run resumes from the checkpoint of step 6 and is killed after step 7: step 7 is trained again by the
# third. A tracker that cannot drop it keeps the second run's values.
RERUN = (7,)


def assert_as_logged(held: dict[str, dict[int, float]], jsonl: dict[str, dict[int, float]], rerun=()) -> None:
    """What a tracker holds is metrics.jsonl, each step of it once, with its values; of a step trained twice
    (`rerun`) it may hold the first training's timings, which are the clock's, not the training's."""
    assert {key: sorted(values) for key, values in held.items()} == {key: sorted(v) for key, v in jsonl.items()}
    for key, values in jsonl.items():
        kept = {step: value for step, value in held[key].items()
                if step not in rerun or key not in ("tokens_per_s", "elapsed")}
        assert kept == {step: values[step] for step in kept}, key


@pytest.fixture
def reference_losses(reference_run) -> dict[int, float]:
    """The same run without trackers or samples, uninterrupted (conftest's reference run)."""
    return logged(reference_run)["loss"]


@pytest.mark.slow
def test_every_tracker_holds_each_step_of_metrics_jsonl_once_after_kills_at_any_moment(
        tmp_path, shards, reference_losses, installed_plugins):
    """TensorBoard, W&B offline, MLflow (SQLite) and the example plugin's tracker in one run, killed right
    after its checkpoint of step 6, resumed and killed again mid-interval (after step 7), resumed to the end.
    W&B's process had written little or nothing of its file when killed: the resumed runs send it, from
    metrics.jsonl, the steps it lacks. MLflow keeps the steps it holds above a checkpoint; TensorBoard and
    the plugin drop them."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from tracker_readers import mlflow_runs, tensorboard_events, wandb_segments

    project_file(tmp_path, shards, *TRAINING, 'train.trackers=["tensorboard", "wandb", "mlflow", "example_tracker"]')
    env = {**installed_plugins, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for fault in ("kill@6", "kill@7"):
        killed = train(tmp_path, env=env, fault=fault)
        assert killed.returncode in (-9, 137), killed.stderr[-3000:]
    resumed = train(tmp_path, "--resume", "required", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning" not in resumed.stderr.lower(), resumed.stderr[-3000:]
    run_dir = tmp_path / "run"
    jsonl = logged(run_dir)
    assert jsonl["loss"] == reference_losses  # the trackers change nothing of the training
    assert sorted(jsonl["loss"]) == list(range(1, 9)) and sorted(jsonl["eval_loss"]) == [4, 8]

    events = tensorboard_events(run_dir)  # the second run's step 7 is purged
    assert_as_logged({tag.removeprefix("train/"): dict(points) for tag, points in events.scalars.items()}, jsonl)
    assert all(len(points) == len(dict(points)) for points in events.scalars.values())
    assert sorted(events.texts["sample"]) == [4, 8] and events.images == {"loss_curve": [8]}

    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    segments = wandb_segments(run_dir / "wandb")  # one per start of the run, all of the same run
    assert len(segments) == 3 and len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 3
    assert_as_logged(held_by_segments(segments, jsonl), jsonl, RERUN)
    last = segments[-1]
    assert (last.run_id, last.project, last.name) == (run_id, "trackers", "run")
    assert last.config["parameters"] == 3_320_640 and "example_tracker" in last.config["train"]["trackers"]
    assert last.summary["model_dir"] == str((run_dir / "model").resolve())
    assert last.summary["loss_curve"]["_type"] == "image-file"

    [run] = mlflow_runs(env["MLFLOW_TRACKING_URI"], "trackers")  # one MLflow run
    assert all(len(points) == len(dict(points)) for points in run["metrics"].values())
    assert_as_logged({key: dict(points) for key, points in run["metrics"].items()}, jsonl, RERUN)
    assert run["status"] == "FINISHED" and run["params"]["parameters"] == "3320640"
    assert run["params"]["train.max_steps"] == "8" and run["params"]["model.preset"] == "nano"
    assert {"config.resolved.toml", "loss.png", "samples/step_00000004.txt", "samples/step_00000008.txt"} <= \
        set(run["artifacts"])
    assert run["tags"]["model_dir"] == str((run_dir / "model").resolve())

    mirrored = [json.loads(line) for line in (run_dir / "mirror.jsonl").read_text().splitlines()]
    assert [record["step"] for record in mirrored] == list(range(1, 9))
    assert_as_logged({key: {r["step"]: r[key] for r in mirrored if key in r} for key in jsonl}, jsonl)


@pytest.mark.slow
def test_trackers_that_fail_mid_run_cost_one_warning_each_and_not_the_run(tmp_path, shards, reference_losses):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tracker_readers import tensorboard_events, wandb_segments

    project_file(tmp_path, shards, *TRAINING, 'train.trackers=["tensorboard", "wandb"]')
    result = train(tmp_path, fault="tracker@3")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {name} failed (RuntimeError: injected failure at step 3); the run goes on "
                        "without it." for name in ("TensorBoard", "W&B")]
    run_dir = tmp_path / "run"
    assert logged(run_dir)["loss"] == reference_losses
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert [step for step, _ in tensorboard_events(run_dir).scalars["train/loss"]] == [1, 2]
    [segment] = wandb_segments(run_dir / "wandb")
    assert sorted(step for step, row in segment.history.items() if "loss" in row) == [1, 2]
