"""Zero-shot benchmarks scored as lm-evaluation-harness 0.4.x scores them: HellaSwag, LAMBADA (OpenAI), PIQA,
ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA, SciQ and BoolQ built in, and any task the registry finds
(registry.TASKS: an installed plugin, "module:attr", "file.py:attr").

`gpt eval --task NAME[,NAME...]` is `evaluate_project_tasks`; training calls `read_all`, `prepare_task`
and `score_task` on every rank (train/observing/task_eval.py). benchmarks.py and multiple_choice.py hold
the definitions (benchmarks.py the lookup), data.py the data, scoring.py the batched log-likelihoods,
stats.py the standard errors.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import GptError, Stopped, UsageError
from ..presets import PRESETS, Published, preset_for_shape
from .benchmarks import Benchmark, Example, Scored, aggregate, benchmark, record_key
from .data import read_examples
from .scoring import Group, encode_example, score_groups

__all__ = ["Benchmark", "Example", "Scored", "TaskResult", "benchmark", "evaluate_project_tasks", "evaluate_tasks",
           "prepare_task", "read_all", "record_key", "score_task", "gpt2_shape"]


@dataclass
class TaskResult:
    name: str
    title: str
    source: str  # where the examples came from
    examples: int
    metrics: dict[str, tuple[float, Optional[float]]]  # metric → (value, standard error)
    higher_is_better: dict[str, bool]
    published: dict[str, Published]  # the model's GPT-2 size's published scores, by metric
    shape: Optional[str]  # the GPT-2 preset whose shape the model has
    seconds: float
    scores: list[list[Scored]] = field(default_factory=list)  # per example, per continuation

    def to_json(self) -> dict:
        metrics = {}
        for name, (value, stderr) in self.metrics.items():
            published = self.published.get(name)
            metrics[name] = {"value": value, "stderr": stderr, "higher_is_better": self.higher_is_better[name],
                             "published": None if published is None else
                             {"value": published.value, "source": published.source}}
        return {"task": self.name, "title": self.title, "source": self.source, "examples": self.examples,
                "metrics": metrics, "gpt2_shape": self.shape, "seconds": round(self.seconds, 3)}


def gpt2_shape(config) -> Optional[str]:
    """The preset whose architecture `config` has, whatever its `preset` key says, when that preset has
    published scores (presets.py: the GPT-2 sizes); else None."""
    shape, _ = preset_for_shape(config)
    return shape.name if shape is not None and shape.scores else None


def prepare_task(examples: list[Example], tokenizer, block_size: int,
                 pick: Callable[[int], bool] = lambda index: True) -> list[Group]:
    """Tokenize the examples this process scores (those whose index `pick` accepts). An example too long
    for the model is found here, before anything is scored."""
    return [encode_example(tokenizer, e, block_size) for e in examples if pick(e.index)]


def score_task(model, bench: Benchmark, groups: list[Group], *, batch_size: int, autocast=None,
               progress: Optional[Callable[[int], None]] = None, min_batches: int = 0,
               full_forward: bool = False) -> tuple[list[list[Scored]], list[dict[str, float]]]:
    """Score the groups (scoring.score_groups); returns per example its continuations' scores and its
    outcomes, in data order."""
    scores = score_groups(model, groups, batch_size, autocast, progress, min_batches, full_forward)
    return scores, [bench.outcomes(g.example, s) for g, s in zip(groups, scores, strict=True)]


def read_all(names: list[str], data_files: dict[str, str], limit: int,
             base_dir: Optional[Path] = None) -> list[tuple[Benchmark, list[Example], str]]:
    """Each task `names` names (as [eval] tasks does: a name or a reference, a file's relative to `base_dir`)
    with its examples and their source; `data_files` is keyed as `names` is. Every bad record is found here."""
    unused = sorted(set(data_files) - set(names))
    if unused:
        raise GptError(f"Task data is given for {', '.join(unused)}, which is not among the tasks scored "
                       f"({', '.join(names)}).")
    benches = [benchmark(name, base_dir) for name in names]
    check_distinct(names, benches)
    return [(bench, *read_examples(bench, data_files.get(name), limit)) for name, bench in zip(names, benches, strict=True)]


def check_distinct(names: list[str], benches: list[Benchmark]) -> None:
    """Two tasks of one name would write the same metrics.jsonl keys."""
    seen: dict[str, str] = {}
    for given, bench in zip(names, benches, strict=True):
        if bench.name in seen:
            raise GptError(f'eval.tasks: "{seen[bench.name]}" and "{given}" are both tasks named "{bench.name}"; '
                           "score one of them.")
        seen[bench.name] = given


def evaluate_tasks(model, tokenizer, tasks: list[tuple[Benchmark, list[Example], str]], *, batch_size: int = 8,
                   autocast=None, progress: Optional[Callable[[str, int, int], None]] = None) -> list[TaskResult]:
    """Score `model` on each (benchmark, examples, source) of `read_all`; progress(name, done, total) after
    every batch. A stop (Ctrl-C, SIGTERM) is reported as how far each task got."""
    block_size = model.config.block_size
    prepared = [(bench, prepare_task(examples, tokenizer, block_size), source)
                for bench, examples, source in tasks]
    check_fits_batches(model, [groups for _, groups, _ in prepared], batch_size)
    shape = gpt2_shape(model.config)
    results: list[TaskResult] = []
    was_training = model.training
    model.eval()
    try:
        for bench, groups, source in prepared:
            results.append(score_one(model, bench, groups, source, shape, batch_size, autocast, progress, results))
    finally:
        model.train(was_training)
    return results


def check_fits_batches(model, tasks: list[list[Group]], batch_size: int) -> None:
    """Refuse a --batch-size whose widest batch clearly cannot fit in memory (machine.py's rule), before
    anything is scored."""
    from ..machine import check_task_scoring_fits

    for groups in (g for g in tasks if g):
        width = max(g.most_packed for g in groups)
        rows = max(sum(len(c) for c in g.continuations) for g in groups)
        batch = min(batch_size, len(groups))
        check_task_scoring_fits(model.config, batch, width, batch * rows, model.wte.weight.device.type)


def score_one(model, bench: Benchmark, groups: list[Group], source: str, shape: Optional[str], batch_size: int,
              autocast, progress, finished: list[TaskResult]) -> TaskResult:
    """One task's result; a stop names the tasks `finished` and how far this one got."""
    done, start = 0, time.perf_counter()

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(bench.name, done, len(groups))

    try:
        scores, outcomes = score_task(model, bench, groups, batch_size=batch_size, autocast=autocast, progress=advance)
    except (KeyboardInterrupt, Stopped) as stop:
        before = "".join(f"{r.title} finished, " for r in finished)
        raise Stopped(getattr(stop, "signal_number", signal.SIGINT),
                      f"{before}{bench.title} stopped after {done:,} of {len(groups):,} examples; no score was "
                      "reported") from None
    return TaskResult(name=bench.name, title=bench.title, source=source, examples=len(groups),
                      metrics=aggregate(bench, outcomes), higher_is_better=bench.higher_is_better,
                      published=PRESETS[shape].scores.get(bench.name, {}) if shape else {}, shape=shape,
                      seconds=time.perf_counter() - start, scores=scores)


def evaluate_project_tasks(project, names: list[str], *, checkpoint: Optional[Path] = None, device: str = "auto",
                           bf16: bool = False,
                           progress: Optional[Callable[[str, int, int], None]] = None) -> list[TaskResult]:
    """`gpt eval --task`: the tasks `names` with the project's [eval] settings (task_data, tasks_limit,
    batch_size), on the model of `checkpoint` (else the project's run dir). The data is read and checked
    before the model loads."""
    import torch

    from ..registry import TASKS
    from ..runtime import load_project_model, resolve_device

    settings = project.eval
    if not names:
        raise UsageError(f"--task: name at least one task ({', '.join(TASKS.names())}).")
    tasks = read_all(names, settings.task_data, settings.tasks_limit, project.reference_dir)
    target = resolve_device(device)
    loaded = load_project_model(project, checkpoint, target)
    autocast = torch.autocast(target.type, dtype=torch.bfloat16) if bf16 else None
    return evaluate_tasks(loaded.model, loaded.tokenizer, tasks, batch_size=settings.batch_size, autocast=autocast,
                          progress=progress)
