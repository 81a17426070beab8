"""[eval] tasks during training: the metrics land in metrics.jsonl and metrics.csv at the set steps, on one
rank and on two (ZeRO-3: the model is called whole, every rank the same number of times), they equal `gpt
eval --task` on the model the run consolidates, a plugin's task ("file.py:attr" beside the project file)
among them, and the losses are those of the same run without tasks, a kill -9 and resume included."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, losses, project_file, records, run_gpt, train, trained
from task_files import HELLASWAG, PIQA, write_jsonl

pytestmark = pytest.mark.slow

# The nano model sees 64 positions: the examples that fit it.
SHORT_HELLASWAG = [r for r in HELLASWAG if len(r["ctx_a"]) < 45]
PASSAGES = ["The cat sat on the mat", "He went home", "She said hello to the man at the door", "It was late",
            "They ate bread and cheese for lunch"]
TASK_KEYS = ["hellaswag_acc", "hellaswag_acc_norm", "lambada_acc", "lambada_perplexity"]
PLUGIN_TASK = "piqa_task.py:TASK"  # examples/plugins' PIQA, copied beside the project file
PLUGIN_KEYS = ["piqa_acc", "piqa_acc_norm"]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict[str, Path]:
    """The task files, written here."""
    directory = tmp_path_factory.mktemp("tasks")
    return {"hellaswag": write_jsonl(directory / "hellaswag.jsonl", SHORT_HELLASWAG),
            "lambada": write_jsonl(directory / "lambada.jsonl", [{"text": t} for t in PASSAGES]),
            "piqa": write_jsonl(directory / "piqa.jsonl", PIQA)}


def with_tasks(task_data: dict[str, Path], every: int) -> tuple[str, ...]:
    return ('eval.tasks=["hellaswag", "lambada"]', f"eval.tasks_every={every}",
            f'eval.task_data={{hellaswag = "{task_data["hellaswag"]}", lambada = "{task_data["lambada"]}"}}')


def with_plugin_task(directory: Path, task_data: dict[str, Path], every: int) -> tuple[str, ...]:
    """The built-in tasks and the example plugin's, named by its file beside the project file."""
    shutil.copy(REPO / "examples" / "plugins" / "gptcli_example_plugins" / "task.py", directory / "piqa_task.py")
    return (f'eval.tasks=["hellaswag", "lambada", "{PLUGIN_TASK}"]', f"eval.tasks_every={every}",
            f'eval.task_data={{hellaswag = "{task_data["hellaswag"]}", lambada = "{task_data["lambada"]}", '
            f'"{PLUGIN_TASK}" = "{task_data["piqa"]}"}}')


def assert_equal_to_gpt_eval(run_dir: Path, task_data: dict[str, Path], last: dict, plugin: Path | None = None) -> None:
    """The last step's task metrics are those `gpt eval --task` gives the consolidated model (with `plugin`,
    the plugin's task file, its task too)."""
    tasks, data, keys = "hellaswag,lambada", [], list(TASK_KEYS)
    if plugin is not None:
        tasks, data, keys = f"{tasks},{plugin}:TASK", ["--task-data", f"{plugin}:TASK={task_data['piqa']}"], \
            keys + PLUGIN_KEYS
    result = run_gpt("eval", "--checkpoint", run_dir, "--task", tasks, "--task-data",
                     f"hellaswag={task_data['hellaswag']}", "--task-data", f"lambada={task_data['lambada']}", *data,
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["tasks"]
    for key in keys:
        task, metric = key.split("_", 1)
        assert last[key] == pytest.approx(report[task]["metrics"][metric]["value"], rel=1e-6), key


def test_one_rank_logs_task_metrics_at_the_set_steps_without_changing_the_run(tmp_path, shards, task_data,
                                                                             reference_run):
    """Killed after step 5 and resumed from the checkpoint of step 3: the tasks were scored at step 3 by the
    killed run and at steps 6 and 8 (the last) by the resumed one; the losses and eval losses are those of the
    reference run, which scores no task."""
    project = project_file(tmp_path, shards, "eval.batch_size=2", *with_plugin_task(tmp_path, task_data, every=3),
                           name="tasks")
    assert train(project, fault="kill@5").returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    scored = records(tmp_path / "tasks")
    assert [r["step"] for r in scored if "hellaswag_acc_norm" in r] == [3, 6, 8]
    assert all(key in r for r in scored if r["step"] in (3, 6, 8) for key in TASK_KEYS + PLUGIN_KEYS)
    assert [r["loss"] for r in scored] == losses(reference_run)
    assert [r.get("eval_loss") for r in scored] == [r.get("eval_loss") for r in records(reference_run)]
    assert "hellaswag acc_norm" in resumed.stderr and "piqa acc_norm" in resumed.stderr  # the live display
    with open(tmp_path / "tasks" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["piqa_acc"]) for row in rows if row["piqa_acc"]] == [r["piqa_acc"] for r in scored
                                                                           if "piqa_acc" in r]
    assert {"hellaswag_acc_norm", "lambada_perplexity", "piqa_acc_norm"} <= set(rows[0])
    assert_equal_to_gpt_eval(tmp_path / "tasks", task_data, scored[-1], plugin=tmp_path / "piqa_task.py")


def test_two_ranks_zero3_divide_the_examples_and_log_the_metrics_of_all(tmp_path, shards, task_data):
    zero3 = ("eval.batch_size=2", "deepspeed.zero_stage=3", "train.max_steps=4", "train.eval_every=0")
    plain = trained(project_file(tmp_path, shards, *zero3, name="plain"), ranks=2)
    # 5 passages on 2 ranks in batches of 2: rank 0 runs 2 forward passes, rank 1 one and one it discards
    scored_run = trained(project_file(tmp_path, shards, *zero3, *with_tasks(task_data, every=2), name="tasks"), ranks=2)
    scored = records(scored_run)
    assert [r["step"] for r in scored if "lambada_perplexity" in r] == [2, 4]
    assert [r["loss"] for r in scored] == losses(plain)
    assert_equal_to_gpt_eval(scored_run, task_data, scored[-1])
