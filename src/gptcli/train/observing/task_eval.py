"""[eval] tasks during training: HellaSwag, LAMBADA or a plugin's task, scored by gptcli.tasks, the code
`gpt eval --task` runs, on every rank.

Rank r scores examples r, r + W, r + 2W, ... (W ranks); each rank adds up its per-example outcomes and one
all-reduce per task combines them, so every rank ends with the metrics of all the examples. The data is
read and tokenized once, at set-up, where a missing file or an example longer than the model's context
stops the run before its first step. Scoring is inference only (eval mode, no gradients, no random
numbers), so the training trajectory and an exact resume are those of a run without it.

Under ZeRO-3 the weights are gathered in hooks around the model's forward, a collective every rank must
join: there the model is called as a whole, as training calls it, and every rank runs the same number of
forward passes (a rank with fewer examples repeats a batch and discards it).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ...config import Project

if TYPE_CHECKING:
    from ...tasks.benchmarks import Benchmark
    from ...tasks.scoring import Group


@dataclass
class TaskSet:
    """What each rank scores: per task, its share of the examples and the number of examples in all."""

    tasks: list[tuple["Benchmark", list["Group"], int]]
    every: int  # score every this many steps
    batch_size: int
    rank: int
    world: int

    def definitions(self) -> list["Benchmark"]:
        """The tasks scored (their names and metrics make the record's keys)."""
        return [bench for bench, _, _ in self.tasks]


def prepare(project: Project, tokenizer, block_size: int, rank: int, world: int,
            overfit_batch: bool = False) -> Optional[TaskSet]:
    """This rank's share of the [eval] tasks, read and checked; None without tasks (or for --overfit-batch)."""
    settings = project.eval
    if not settings.tasks or overfit_batch:
        return None
    every = settings.tasks_every or project.train.eval_every
    if not every:
        if rank == 0:
            print("note: eval.tasks are set but eval.tasks_every and train.eval_every are 0: no task is scored "
                  "during training.", file=sys.stderr)
        return None
    from ...tasks import prepare_task, read_all

    tasks = []
    for bench, examples, _ in read_all(settings.tasks, settings.task_data, settings.tasks_limit, project.reference_dir):
        groups = prepare_task(examples, tokenizer, block_size, pick=lambda i: i % world == rank)
        tasks.append((bench, groups, len(examples)))
    return TaskSet(tasks, every, settings.batch_size, rank, world)


def score(engine, task_set: TaskSet, zero3: bool) -> dict[str, float]:
    """Every task's metrics over all ranks' examples, under their record keys ("hellaswag_acc"). Every rank
    calls this."""
    import deepspeed.comm as dist

    from ...tasks import score_task
    from ...tasks.benchmarks import from_sums, record_key

    record = {}
    engine.eval()
    try:
        for bench, groups, total in task_set.tasks:
            most_per_rank = math.ceil(total / task_set.world)
            _, outcomes = score_task(engine.module, bench, groups, batch_size=task_set.batch_size,
                                     min_batches=math.ceil(most_per_rank / task_set.batch_size) if zero3 else 0,
                                     full_forward=zero3)
            keys = sorted({rule.split(":")[1] for rule in bench.metrics.values()})
            sums = torch.tensor([sum(o[key] for o in outcomes) for key in keys] + [len(outcomes)],
                                dtype=torch.float64, device=engine.device)
            dist.all_reduce(sums)
            values = sums.tolist()
            metrics = from_sums(bench, dict(zip(keys, values[:-1], strict=True)), int(values[-1]))
            record.update({record_key(bench.name, metric): value for metric, value in metrics.items()})
    finally:
        engine.train()
    return record
