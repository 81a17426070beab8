"""A zero-shot task for gptcli: PIQA (physical commonsense, two candidate solutions to a goal), as
lm-evaluation-harness 0.4 defines it (lm_eval/tasks/piqa/piqa.yaml): the context "Question: {goal}\nAnswer:",
the choices sol1 and sol2, the gold one `label`; acc and acc_norm.

    gpt eval --checkpoint runs/gpt2 --task example_task --task-data piqa_valid.jsonl
    [eval] tasks = ["example_task"]   task_data = { example_task = "piqa_valid.jsonl" }

Each line of the data file is one record with the fields below, as the Hub dataset has them:
{"goal": "...", "sol1": "...", "sol2": "...", "label": 0}. Without a data file gptcli reads `hub`
through `datasets` (when it is in the datasets cache, or the Hub can be reached).
"""

from __future__ import annotations

from gptcli.errors import GptError
from gptcli.tasks import Benchmark, Example, Scored


def piqa_example(record: dict, index: int, where: str) -> Example:
    """A record → the context and its two continuations (each after lm-eval's target delimiter " ")."""
    texts = [record[key] for key in ("goal", "sol1", "sol2")]
    if not all(isinstance(text, str) for text in texts):
        raise GptError(f"{where}: goal, sol1 and sol2 must be text.")
    if record["label"] not in (0, 1):
        raise GptError(f"{where}: label must be 0 (sol1) or 1 (sol2), not {record['label']!r}.")
    goal, *choices = texts
    return Example(index=index, context=f"Question: {goal}\nAnswer:", continuations=tuple(" " + c for c in choices),
                   choices=tuple(choices), gold=record["label"], where=where)


def piqa_outcomes(example: Example, scored: list[Scored]) -> dict[str, float]:
    """acc: the likelier solution is the gold one; acc_norm: the same with each summed log-likelihood divided
    by the solution's length in characters. A tie goes to the first, as lm-eval's argmax does."""
    loglikelihoods = [s.loglikelihood for s in scored]
    normalised = [value / max(len(choice), 1) for value, choice in zip(loglikelihoods, example.choices)]
    return {"acc": float(loglikelihoods.index(max(loglikelihoods)) == example.gold),
            "acc_norm": float(normalised.index(max(normalised)) == example.gold)}


TASK = Benchmark(
    name="piqa",  # metrics.jsonl and metrics.csv: piqa_acc, piqa_acc_norm
    title="PIQA",
    fields=("goal", "sol1", "sol2", "label"),
    example=piqa_example,
    outcomes=piqa_outcomes,
    metrics={"acc": "mean:acc", "acc_norm": "mean:acc_norm"},  # the mean over the examples of each outcome
    higher_is_better={"acc": True, "acc_norm": True},
    headline="acc_norm",  # what the training display shows
    hub=("baber/piqa", None, "validation"),  # the dataset lm-eval 0.4 reads: id, config, split
)
