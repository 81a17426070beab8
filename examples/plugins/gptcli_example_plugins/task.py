"""A zero-shot task for gptcli: Social IQa (reasoning about people's actions and feelings, three candidate
answers), as lm-evaluation-harness 0.4 defines it (lm_eval/tasks/siqa/siqa.yaml): the context
"Q: {context} {question}\nA:", the choices answerA, answerB and answerC, the gold one `label` ("1".."3");
acc.

    gpt eval --checkpoint runs/gpt2 --task example_task --task-data siqa_validation.jsonl
    [eval] tasks = ["example_task"]   task_data = { example_task = "siqa_validation.jsonl" }

Each line of the data file is one record with the fields below, as the Hub dataset has them:
{"context": "...", "question": "...", "answerA": "...", "answerB": "...", "answerC": "...", "label": "1"}.
Without a data file gptcli reads `hub` through `datasets` (when it is in the datasets cache, or the Hub can be
reached).
"""

from __future__ import annotations

from gptcli.errors import GptError
from gptcli.tasks import Benchmark, Example, Scored

ANSWERS = ("answerA", "answerB", "answerC")


def siqa_example(record: dict, index: int, where: str) -> Example:
    """A record → the context and its three continuations (each after lm-eval's target delimiter " ")."""
    texts = [record[key] for key in ("context", "question", *ANSWERS)]
    if not all(isinstance(text, str) for text in texts):
        raise GptError(f"{where}: context, question and {', '.join(ANSWERS)} must be text.")
    if record["label"] not in ("1", "2", "3"):
        raise GptError(f'{where}: label must be "1", "2" or "3" (the right answer), not {record["label"]!r}.')
    context, question, *choices = texts
    return Example(index=index, context=f"Q: {context} {question}\nA:", continuations=tuple(" " + c for c in choices),
                   choices=tuple(choices), gold=int(record["label"]) - 1, where=where)


def siqa_outcomes(example: Example, scored: list[Scored]) -> dict[str, float]:
    """acc: the likeliest answer is the gold one. A tie goes to the first, as lm-eval's argmax does."""
    loglikelihoods = [s.loglikelihood for s in scored]
    return {"acc": float(loglikelihoods.index(max(loglikelihoods)) == example.gold)}


TASK = Benchmark(
    name="social_iqa",  # metrics.jsonl and metrics.csv: social_iqa_acc
    title="Social IQa",
    fields=("context", "question", *ANSWERS, "label"),
    example=siqa_example,
    outcomes=siqa_outcomes,
    metrics={"acc": "mean:acc"},  # the mean over the examples of each outcome
    higher_is_better={"acc": True},
    headline="acc",  # what the training display shows
    hub=("lighteval/siqa", None, "validation"),  # the dataset lm-eval 0.4 reads: id, config, split
)
