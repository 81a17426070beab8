"""The benchmarks: how a record of each dataset becomes a context and its candidate continuations, how the
scored continuations become metrics. (GPT-2's published scores are the presets', presets.py.)

A task is a `Benchmark` (or any object with its fields: docs/extending.md), found through the registry
(`registry.TASKS`): the built-ins HELLASWAG and LAMBADA here and the rest of the suite in multiple_choice.py,
an installed package's entry point, or a "module:attr" / "file.py:attr" reference. Both built-ins here follow
lm-evaluation-harness 0.4.x's task definitions (lm_eval/tasks/hellaswag/hellaswag.yaml and utils.py,
lm_eval/tasks/lambada/lambada_openai.yaml), zero-shot, with its default target delimiter " " between context
and continuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import GptError
from ..parsing import is_whole_number
from ..registry import TASKS
from . import stats


@dataclass(frozen=True)
class Example:
    """One scored item: a context and the continuations whose log-likelihoods are compared."""

    index: int  # position in the data, from 0
    context: str
    continuations: tuple[str, ...]  # each with the " " delimiter in front, as lm-eval scores it
    choices: tuple[str, ...]  # the continuations' text without the delimiter (acc_norm divides by its length)
    gold: int  # the right continuation
    where: str = field(default="", compare=False)  # how messages name it: file and line, or dataset and number
    # Per continuation, the context it follows, when the choices differ in the context and share what comes
    # after it (WinoGrande: each option fills the blank, the rest of the sentence is scored); empty: every
    # continuation follows `context`.
    contexts: tuple[str, ...] = ()

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs scored, one per continuation, in order."""
        contexts = self.contexts or (self.context,) * len(self.continuations)
        return list(zip(contexts, self.continuations, strict=True))


@dataclass(frozen=True)
class Scored:
    """A continuation's summed log-likelihood and whether greedy decoding would have produced it."""

    loglikelihood: float
    greedy: bool


@dataclass(frozen=True)
class Benchmark:
    """A zero-shot task: what gptcli reads of any task object (docs/extending.md, "Tasks")."""

    name: str  # the task's name in records and reports: metrics.jsonl's "<name>_<metric>"
    title: str  # how tables and messages name it
    fields: tuple[str, ...]  # the record fields it needs
    example: Callable[[dict, int, str], Example]  # record, index, where it is (for messages) → Example
    outcomes: Callable[[Example, list[Scored]], dict[str, float]]  # per-example values the metrics average
    metrics: dict[str, str]  # metric → "mean:<outcome>" or "perplexity:<outcome>"
    higher_is_better: dict[str, bool]
    headline: str  # the metric the training display shows
    hub: Optional[tuple[str, Optional[str], str]] = None  # the Hub dataset it reads without task data: id, config, split


# --- HellaSwag ----------------------------------------------------------------------------------------------


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip; " [title]" becomes ". "; every "[...]" is removed (WikiHow
    markup, shortest match); then each double space becomes one (one pass, as str.replace does)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(record: dict, index: int, where: str) -> Example:
    """Context = activity label + ": " + ctx_a + " " + ctx_b with its first letter capitalised (the rest
    lower-cased, as str.capitalize does); the endings are the choices."""
    activity, ctx_a, ctx_b = (text_field(record, key, where) for key in ("activity_label", "ctx_a", "ctx_b"))
    endings = record["endings"]
    if not isinstance(endings, (list, tuple)) or not endings or not all(isinstance(e, str) for e in endings):
        raise GptError(f"{where}: endings must be a non-empty list of strings, not {shown(endings)}.")
    context = hellaswag_clean(activity + ": " + ctx_a + " " + ctx_b.capitalize())
    choices = tuple(hellaswag_clean(ending) for ending in endings)
    return Example(index, context, tuple(" " + c for c in choices), choices,
                   hellaswag_label(record, where, len(choices)), where)


def hellaswag_label(record: dict, where: str, count: int) -> int:
    """The label as lm-eval reads it: the record's label rendered as text must be the digits of an index
    of the endings (the hub stores "0".."3"; the original JSONL stores integers)."""
    label = record["label"]
    text = str(label) if isinstance(label, (int, str)) and not isinstance(label, bool) else ""
    if not is_whole_number(text):  # not "²", nor thousands of digits
        hint = " (the test split has no labels; score the validation split)" if text == "" else ""
        raise GptError(f"{where}: label {shown(label)} is not the index of one of its endings{hint}.")
    if int(text) >= count:
        raise GptError(f"{where}: label {shown(label)} is not the index of one of its {count} endings.")
    return int(text)


# --- LAMBADA (OpenAI) ---------------------------------------------------------------------------------------


def lambada_example(record: dict, index: int, where: str) -> Example:
    """Context = every word but the last (words split on single spaces, joined back with them);
    continuation = " " + the last word."""
    text = text_field(record, "text", where)
    if not text.strip():
        raise GptError(f"{where}: text is empty.")
    words = text.split(" ")
    target = words[-1]
    return Example(index, " ".join(words[:-1]), (" " + target,), (target,), 0, where)


def lambada_outcomes(example: Example, scored: list[Scored]) -> dict[str, float]:
    """acc: every token of the last word is the greedy choice; the log-likelihood feeds the perplexity."""
    return {"acc": float(scored[0].greedy), "loglikelihood": scored[0].loglikelihood}


# --- shared -------------------------------------------------------------------------------------------------


def choice_outcomes(example: Example, scored: list[Scored]) -> dict[str, float]:
    """lm-eval's multiple-choice outcomes. acc: the most likely continuation is the gold one; acc_norm: the
    same after dividing each summed log-likelihood by its choice's length in characters (lm-eval 0.4's
    `len` of the choice's text, without the delimiter). np.argmax takes the first of equal values, as lm-eval
    does."""
    loglikelihoods = np.array([s.loglikelihood for s in scored], dtype=np.float64)
    lengths = np.array([float(len(c)) for c in example.choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = loglikelihoods / lengths
    return {"acc": float(int(np.argmax(loglikelihoods)) == example.gold),
            "acc_norm": float(int(np.argmax(normalised)) == example.gold)}



def text_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise GptError(f"{where}: {key} must be text, not {shown(value)}.")
    return value


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


HELLASWAG = Benchmark(
    name="hellaswag", title="HellaSwag", hub=("Rowan/hellaswag", None, "validation"),
    fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    example=hellaswag_example, outcomes=choice_outcomes,
    metrics={"acc": "mean:acc", "acc_norm": "mean:acc_norm"},
    higher_is_better={"acc": True, "acc_norm": True}, headline="acc_norm",
)
LAMBADA = Benchmark(
    name="lambada", title="LAMBADA (OpenAI)", hub=("EleutherAI/lambada_openai", "default", "test"),
    fields=("text",), example=lambada_example, outcomes=lambada_outcomes,
    metrics={"acc": "mean:acc", "perplexity": "perplexity:loglikelihood"},
    higher_is_better={"acc": True, "perplexity": False}, headline="acc",
)


# --- finding a task -----------------------------------------------------------------------------------------

RULES = ("mean", "perplexity")  # how a metric is made of the per-example outcomes (aggregate, from_sums)


def benchmark(name: str, base_dir: Optional[Path] = None, where: str = "eval.tasks") -> Benchmark:
    """The task `name` names (a registered name, "module:attr", or "file.py:attr" relative to `base_dir`,
    the project file's directory), checked to be a task; else one GptError sentence."""
    task = TASKS.resolve(name, base_dir, where)
    check_task(task, f'{where} = "{name}"')
    return task


def check_task(task, where: str) -> None:
    """Refuse, in one sentence, an object that lacks what gptcli reads of a task (docs/extending.md)."""
    missing = [key for key in ("name", "title", "fields", "example", "outcomes", "metrics", "higher_is_better",
                               "headline") if not hasattr(task, key)]
    if missing:
        raise GptError(f"{where} is not a task: it has no {', '.join(missing)} (docs/extending.md says what a "
                       "task provides; gptcli.tasks.Benchmark has it all).")
    if not isinstance(task.name, str) or not re.fullmatch(r"[A-Za-z][\w.-]*", task.name):
        raise GptError(f"{where}: the task's name {shown(task.name)} must be a word (letters, digits, _ . -), as "
                       "metrics.jsonl names its metrics after it.")
    bad = [f"{metric} = {shown(rule)}" for metric, rule in task.metrics.items()
           if not isinstance(rule, str) or rule.partition(":")[0] not in RULES or not rule.partition(":")[2]]
    if bad or not task.metrics:
        raise GptError(f"{where}: each metric must be \"mean:<outcome>\" or \"perplexity:<outcome>\", not "
                       f"{', '.join(bad) or 'none at all'}.")
    if set(task.higher_is_better) != set(task.metrics) or task.headline not in task.metrics:
        raise GptError(f"{where}: higher_is_better must name each metric ({', '.join(task.metrics)}) and the "
                       f"headline {shown(task.headline)} must be one of them.")


def record_key(task: str, metric: str) -> str:
    """How metrics.jsonl, metrics.csv, the trackers and the display name a task's metric: "hellaswag_acc"."""
    return f"{task}_{metric}"


def aggregate(bench: Benchmark, outcomes: list[dict[str, float]], with_stderr: bool = True) -> dict[str, tuple[float, Optional[float]]]:
    """metric → (value, standard error or None) over the per-example outcomes, in data order."""
    result = {}
    for metric, rule in bench.metrics.items():
        kind, key = rule.split(":")
        values = [o[key] for o in outcomes]
        if kind == "mean":
            result[metric] = (stats.mean(values), stats.mean_stderr(values) if with_stderr else None)
        else:
            result[metric] = (stats.perplexity(values),
                              stats.bootstrap_perplexity_stderr(values) if with_stderr else None)
    return result


def from_sums(bench: Benchmark, sums: dict[str, float], count: int) -> dict[str, float]:
    """The metrics from per-outcome sums over `count` examples (ranks add their sums; no standard error)."""
    result = {}
    for metric, rule in bench.metrics.items():
        kind, key = rule.split(":")
        average = sums[key] / count
        result[metric] = average if kind == "mean" else float(np.exp(-average))
    return result
