"""Trackers at their edges: a start that never ends is a warning after START_TIMEOUT_S, a library that exits at
import or refuses its own environment is a warning naming why, a damaged RUN/trackers.json is named, and the
libraries' chatter (MLflow's INFO lines, torch's "No CUDA runtime is found") goes to the run's library log, not
the terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings

import pytest

from gptcli.config import load_project
from gptcli.train.observing import trackers
from gptcli.train.observing.trackers import start_one


class Quiet:
    closed = False

    def last_step(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def test_a_start_that_never_answers_is_one_warning_after_the_timeout(capsys):
    """MLFLOW_TRACKING_URI of a server that accepts and never answers: "starting the trackers: MLflow" for
    290 s. A start now has START_TIMEOUT_S; one that finishes after the run went on is closed."""
    answer, made = threading.Event(), Quiet()

    def make():
        answer.wait(30)
        return made

    assert start_one("MLflow", make, timeout=0.3) is None
    assert capsys.readouterr().err == ("warning: MLflow could not start (TimeoutError: no answer within 0 s); the run "
                                       "goes on without it.\n")
    answer.set()
    for _ in range(200):
        if made.closed:
            break
        threading.Event().wait(0.05)
    assert made.closed
    assert trackers.START_TIMEOUT_S <= 60  # the one warning comes within a minute


def test_an_unopenable_sqlite_store_is_found_at_once(tmp_path):
    """MLflow retried it for 105 s with 36 lines of warnings."""
    with pytest.raises(RuntimeError, match="cannot open the SQLite store"):
        trackers.check_sqlite_store(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'mlflow.db'}")
    trackers.check_sqlite_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a new store is fine
    trackers.check_sqlite_store("http://127.0.0.1:5000")  # not SQLite: MLflow's own (bounded) calls decide


def test_mlflow_calls_to_a_server_are_bounded_unless_the_user_set_them():
    assert trackers.MLFLOW_HTTP_DEFAULTS == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


def unset_wandb_silent(monkeypatch) -> None:
    """WANDB_SILENT unset, in a way monkeypatch undoes even when it was unset before: the W&B tracker sets it."""
    monkeypatch.setenv("WANDB_SILENT", "")
    monkeypatch.delenv("WANDB_SILENT")


def test_a_library_that_exits_at_import_is_a_warning_not_the_end_of_the_run(tmp_path, monkeypatch, capsys):
    """A `wandb` that raises SystemExit at import ended `gpt train` with exit 7 and no word."""
    package = tmp_path / "site" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit(7)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    unset_wandb_silent(monkeypatch)  # the tracker sets it before the import
    for name in [name for name in sys.modules if name == "wandb" or name.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    project = load_project(None, ['train.trackers=["wandb"]', f'project.out_dir="{tmp_path / "run"}"'])
    assert trackers.start_trackers(project, tmp_path / "run", 0) == []
    assert capsys.readouterr().err == ("warning: W&B could not start (SystemExit: it called sys.exit(7)); the run "
                                       "goes on without it.\n")


def test_a_wandb_mode_wandb_does_not_know_is_named():
    """WANDB_MODE=garbage gave a pydantic ValidationError that did not name the variable."""
    import wandb

    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setenv("WANDB_MODE", "garbage")
        with pytest.raises(ValueError, match="WANDB_MODE='garbage' is not one of online, offline"):
            trackers.check_wandb_mode(wandb)
        monkeypatch.setenv("WANDB_MODE", "offline")
        trackers.check_wandb_mode(wandb)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "{" * 5000], ids=["garbage", "not-an-object", "deep"])
def test_a_damaged_trackers_json_is_named_once(tmp_path, capsys, content, monkeypatch):
    """A damaged trackers.json switched the trackers to new runs with messages that did not name it."""
    monkeypatch.setattr(trackers, "_said_damaged", set())
    (tmp_path / "trackers.json").write_text(content)
    assert trackers.stored(tmp_path, "wandb") == {} and trackers.stored(tmp_path, "mlflow") == {}
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and f"warning: {tmp_path / 'trackers.json'} cannot be read" in said, said
    trackers.remember(tmp_path, "wandb", {"id": "abc"})  # written anew
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"wandb": {"id": "abc"}}


@pytest.fixture
def library_log(monkeypatch):
    """A LibraryLog whose routing of warnings and loggers is undone after the test."""
    from gptcli.train.observing import chatter

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    for name in chatter.LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(chatter, "_active", None)
    return chatter.LibraryLog()


def test_library_chatter_goes_to_the_run_s_log_not_the_terminal(tmp_path, library_log, capsys):
    """torch's "No CUDA runtime is found" on every rank of every run, MLflow's INFO lines: in RUN/deepspeed.log."""
    from gptcli.train.observing.chatter import route_library_loggers

    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr'")
    mlflow = logging.getLogger("mlflow")
    mlflow.addHandler(logging.StreamHandler(sys.stderr))  # as MLflow's import sets itself up
    mlflow.setLevel(logging.INFO)
    route_library_loggers()
    mlflow.info("Created experiment 'run' with id 1")
    library_log.settle(tmp_path)
    assert capsys.readouterr().err == ""
    log = (tmp_path / "deepspeed.log").read_text()
    assert "[torch.utils.cpp_extension WARNING] No CUDA runtime is found" in log
    assert "[mlflow INFO] Created experiment 'run' with id 1" in log


@pytest.mark.parametrize("given, expected", [(None, "true"), ("false", "false")])
def test_the_wandb_summary_is_silenced_unless_the_user_asks_for_it(tmp_path, monkeypatch, given, expected):
    """W&B's 30-line summary on the terminal: silenced (its own logs in RUN/wandb keep it), unless WANDB_SILENT
    is set."""
    import types

    seen = {}

    class Stop(Exception):
        pass

    def init(**settings):
        seen["silent"] = trackers.os.environ.get("WANDB_SILENT")
        raise Stop()

    fake = types.ModuleType("wandb")
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if given is None:
        unset_wandb_silent(monkeypatch)
    else:
        monkeypatch.setenv("WANDB_SILENT", given)
    config = {"train": {"tracker_project": None, "tracker_run_name": None}, "project": {"name": "x"}}
    with pytest.raises(Stop):
        trackers.WandbTracker(tmp_path, config, 0)
    assert seen["silent"] == expected
