"""[eval] tasks during training: the metrics land in metrics.jsonl and metrics.csv at the set steps, on one
rank and on two (ZeRO-3: the model is called whole, every rank the same number of times), they equal `gpt
eval --task` on the model the run consolidates, a plugin's task ("file.py:attr" beside the project file)
among them, and the losses are those of the same run without tasks, a kill -9 and resume included."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import tomllib

from conftest import REPO, run_gpt
from gptcli.config import apply_overrides, dump_toml, project_from_dict
from shard_fixture import make_shards
from task_files import HELLASWAG, SIQA, write_jsonl

pytestmark = pytest.mark.slow

PROJECT = """\
[project]
out_dir = "{out}"
seed = 1234
[data]
dir = "{data}"
[model]
preset = "nano"
dropout = 0.1
[train]
max_steps = 6
micro_batch_size = 4
grad_accum_steps = 2
seq_len = 64
lr = 3e-3
warmup_steps = 2
checkpoint_every = 2
eval_every = 4
eval_batches = 2
device = "cpu"
[deepspeed]
zero_stage = 2
[eval]
batch_size = 2
"""

# The nano model sees 64 positions: the examples that fit it.
SHORT_HELLASWAG = [r for r in HELLASWAG if len(r["ctx_a"]) < 45]
PASSAGES = ["The cat sat on the mat", "He went home", "She said hello to the man at the door", "It was late",
            "They ate bread and cheese for lunch"]
TASK_KEYS = ["hellaswag_acc", "hellaswag_acc_norm", "lambada_acc", "lambada_perplexity"]
PLUGIN_TASK = "siqa_task.py:TASK"  # examples/plugins' Social IQa, copied beside the project file
PLUGIN_KEYS = ["social_iqa_acc"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Shards of generated text (nothing from ../shared) and the task files."""
    directory = tmp_path_factory.mktemp("corpus")
    draw = random.Random(0)
    words = "the a cat dog sat ran on under mat house tree we they saw found went home and then quickly".split()
    text = "\n".join(" ".join(draw.choice(words) for _ in range(12)) + "." for _ in range(6000))
    (directory / "text.txt").write_text(text)
    return {"shards": make_shards(directory / "text.txt", directory / "shards", val_tokens=5_000),
            "hellaswag": write_jsonl(directory / "hellaswag.jsonl", SHORT_HELLASWAG),
            "lambada": write_jsonl(directory / "lambada.jsonl", [{"text": t} for t in PASSAGES]),
            "siqa": write_jsonl(directory / "siqa.jsonl", SIQA)}


def project_file(directory: Path, corpus: dict[str, Path], name: str, *overrides: str) -> Path:
    raw = apply_overrides(tomllib.loads(PROJECT.format(out=directory / name, data=corpus["shards"])), list(overrides))
    path = directory / f"{name}.toml"
    path.write_text(dump_toml(project_from_dict(raw, source=str(path))))
    return path


def with_tasks(corpus: dict[str, Path], every: int) -> tuple[str, ...]:
    return ('eval.tasks=["hellaswag", "lambada"]', f"eval.tasks_every={every}",
            f'eval.task_data={{hellaswag = "{corpus["hellaswag"]}", lambada = "{corpus["lambada"]}"}}')


def with_plugin_task(directory: Path, corpus: dict[str, Path], every: int) -> tuple[str, ...]:
    """The built-in tasks and the example plugin's, named by its file beside the project file."""
    shutil.copy(REPO / "examples" / "plugins" / "gptcli_example_plugins" / "task.py", directory / "siqa_task.py")
    return (f'eval.tasks=["hellaswag", "lambada", "{PLUGIN_TASK}"]', f"eval.tasks_every={every}",
            f'eval.task_data={{hellaswag = "{corpus["hellaswag"]}", lambada = "{corpus["lambada"]}", '
            f'"{PLUGIN_TASK}" = "{corpus["siqa"]}"}}')


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(project: Path, *args: str, fault: str = ""):
    return run_gpt("train", "--project", project, *args, env={"GPTCLI_FAULT": fault} if fault else None)


def assert_equal_to_gpt_eval(run_dir: Path, corpus: dict[str, Path], last: dict, plugin: Path | None = None) -> None:
    """The last step's task metrics are those `gpt eval --task` gives the consolidated model (with `plugin`,
    the plugin's task file, its task too)."""
    tasks, data, keys = "hellaswag,lambada", [], list(TASK_KEYS)
    if plugin is not None:
        tasks, data, keys = f"{tasks},{plugin}:TASK", ["--task-data", f"{plugin}:TASK={corpus['siqa']}"], \
            keys + PLUGIN_KEYS
    result = run_gpt("eval", "--checkpoint", run_dir, "--task", tasks, "--task-data",
                     f"hellaswag={corpus['hellaswag']}", "--task-data", f"lambada={corpus['lambada']}", *data,
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["tasks"]
    for key in keys:
        task = next(name for name in report if key.startswith(f"{name}_"))
        metric = key[len(task) + 1:]
        assert last[key] == pytest.approx(report[task]["metrics"][metric]["value"], rel=1e-6), key


def test_one_rank_logs_task_metrics_at_the_set_steps_without_changing_the_run(tmp_path, corpus):
    """Killed after step 5 and resumed from the checkpoint of step 4: the tasks were scored at step 3 by the
    killed run and at step 6 by the resumed one."""
    plain = train(project_file(tmp_path, corpus, "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    project = project_file(tmp_path, corpus, "tasks", *with_plugin_task(tmp_path, corpus, every=3))
    assert train(project, fault="kill@5").returncode in (-9, 137)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    scored = records(tmp_path / "tasks")
    assert [r["step"] for r in scored if "hellaswag_acc_norm" in r] == [3, 6]
    assert all(key in r for r in scored if r["step"] in (3, 6) for key in TASK_KEYS + PLUGIN_KEYS)
    assert [r["loss"] for r in scored] == [r["loss"] for r in records(tmp_path / "plain")]
    assert [r.get("eval_loss") for r in scored] == [r.get("eval_loss") for r in records(tmp_path / "plain")]
    assert "hellaswag acc_norm" in resumed.stderr and "social_iqa acc" in resumed.stderr  # the live display
    with open(tmp_path / "tasks" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["social_iqa_acc"]) for row in rows if row["social_iqa_acc"]] == \
        [r["social_iqa_acc"] for r in scored if "social_iqa_acc" in r]
    assert {"hellaswag_acc_norm", "lambada_perplexity", "social_iqa_acc"} <= set(rows[0])
    assert_equal_to_gpt_eval(tmp_path / "tasks", corpus, scored[-1], plugin=tmp_path / "siqa_task.py")


def test_two_ranks_zero3_divide_the_examples_and_log_the_metrics_of_all(tmp_path, corpus):
    zero3 = ("deepspeed.zero_stage=3", "train.max_steps=4", "train.eval_every=0")
    plain = train(project_file(tmp_path, corpus, "plain", *zero3), "--nproc", "2")
    assert plain.returncode == 0, plain.stderr[-3000:]
    # 5 passages on 2 ranks in batches of 2: rank 0 runs 2 forward passes, rank 1 one and one it discards
    scored_run = train(project_file(tmp_path, corpus, "tasks", *zero3, *with_tasks(corpus, every=2)), "--nproc", "2")
    assert scored_run.returncode == 0, scored_run.stderr[-3000:]
    scored = records(tmp_path / "tasks")
    assert [r["step"] for r in scored if "lambada_perplexity" in r] == [2, 4]
    assert [r["loss"] for r in scored] == [r["loss"] for r in records(tmp_path / "plain")]
    assert_equal_to_gpt_eval(tmp_path / "tasks", corpus, scored[-1])
