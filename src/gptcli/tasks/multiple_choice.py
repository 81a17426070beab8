"""The zero-shot suite small models are compared on, beside HellaSwag and LAMBADA (benchmarks.py): PIQA,
ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA, SciQ and BoolQ, each as lm-evaluation-harness 0.4.x defines
it (the YAML and utils of lm_eval/tasks/piqa, arc, winogrande, openbookqa, sciq and super_glue/boolq):
the Hub dataset and the split lm-eval scores (its test split where the task names one, else validation),
the prompt, the choices, the gold index and the metrics, zero-shot, with lm-eval's default target delimiter
" " between context and choice.

Each is multiple choice: the example's choices are scored as continuations and the likeliest is its
answer (benchmarks.choice_outcomes: acc, and acc_norm where lm-eval reports it). WinoGrande is the other
way round: its two options fill the blank in the context and the rest of the sentence, the same for both,
is the continuation scored (lm-eval's "partial scoring").

A record lm-eval would misread (a gold label that names no choice, which lm-eval scores as a miss with a
warning) is refused here, naming its file and line.
"""

from __future__ import annotations

from typing import Optional

from ..errors import GptError
from .benchmarks import Benchmark, Example, Scored, choice_outcomes, shown, text_field

ACC = {"acc": "mean:acc"}
ACC_AND_NORM = {"acc": "mean:acc", "acc_norm": "mean:acc_norm"}


def choice_example(index: int, context: str, choices: list[str], gold: int, where: str) -> Example:
    """An example whose choices follow one context, each after lm-eval's target delimiter " "."""
    return Example(index, context, tuple(" " + c for c in choices), tuple(choices), gold, where)


def accuracy(example: Example, scored: list[Scored]) -> dict[str, float]:
    """acc alone, for the tasks whose lm-eval definition reports no acc_norm (WinoGrande, BoolQ)."""
    return {"acc": choice_outcomes(example, scored)["acc"]}


def label_index(record: dict, key: str, where: str, count: int, meaning: str) -> int:
    """An integer label that is the index of one of `count` choices (bool is not an integer here)."""
    label = record[key]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < count:
        raise GptError(f"{where}: {key} must be {meaning}, not {shown(label)}.")
    return label


def labelled_choices(record: dict, where: str) -> tuple[list[str], list[str]]:
    """The Hub's `choices` of ARC and OpenBookQA: {"text": [...], "label": [...]}, lists of text of one length."""
    choices = record["choices"]
    texts = choices.get("text") if isinstance(choices, dict) else None
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not (isinstance(texts, list) and isinstance(labels, list) and texts and len(texts) == len(labels)
            and all(isinstance(item, str) for item in texts + labels)):
        raise GptError(f"{where}: choices must be {{\"text\": [...], \"label\": [...]}}, two lists of text of one "
                       f"length, not {shown(choices)}.")
    return texts, labels


def gold_of(labels: list[str], answer: str, where: str, key: str = "answerKey") -> int:
    if answer not in labels:
        raise GptError(f"{where}: {key} {shown(answer)} is not one of the choices' labels ({', '.join(labels)}).")
    return labels.index(answer)


# --- PIQA (Bisk et al. 2020) --------------------------------------------------------------------------------


def piqa_example(record: dict, index: int, where: str) -> Example:
    """"Question: {goal}\\nAnswer:"; the choices sol1, sol2; gold = label."""
    goal, first, second = (text_field(record, key, where) for key in ("goal", "sol1", "sol2"))
    gold = label_index(record, "label", where, 2, "0 (sol1) or 1 (sol2)")
    return choice_example(index, f"Question: {goal}\nAnswer:", [first, second], gold, where)


# --- ARC (Clark et al. 2018) and OpenBookQA (Mihaylov et al. 2018) --------------------------------------------


def arc_example(record: dict, index: int, where: str) -> Example:
    """"Question: {question}\\nAnswer:"; the choices' texts; gold = the index of answerKey among their labels
    (some questions label their choices 1-4 rather than A-D)."""
    question = text_field(record, "question", where)
    texts, labels = labelled_choices(record, where)
    gold = gold_of(labels, text_field(record, "answerKey", where), where)
    return choice_example(index, f"Question: {question}\nAnswer:", texts, gold, where)


def openbookqa_example(record: dict, index: int, where: str) -> Example:
    """The question stem alone is the context; the choices' texts; gold = the index of answerKey (leading
    whitespace stripped) among their labels."""
    stem = text_field(record, "question_stem", where)
    texts, labels = labelled_choices(record, where)
    gold = gold_of(labels, text_field(record, "answerKey", where).lstrip(), where)
    return choice_example(index, stem, texts, gold, where)


# --- WinoGrande (Sakaguchi et al. 2019) ---------------------------------------------------------------------


def winogrande_example(record: dict, index: int, where: str) -> Example:
    """Each option fills the blank "_": the context is the sentence up to the blank with the option in it,
    the continuation " " + the rest of the sentence after the blank, stripped, the same for both options;
    gold = answer ("1" or "2") − 1. lm-eval's choices are the two contexts (what acc_norm would divide by;
    it reports acc only)."""
    sentence, first, second = (text_field(record, key, where) for key in ("sentence", "option1", "option2"))
    blank = sentence.find("_")
    if blank < 0:
        raise GptError(f"{where}: sentence has no blank \"_\" for an option to fill.")
    answer = record["answer"]
    if answer not in ("1", "2"):
        hint = " (the test split has no answers; score the validation split)" if answer == "" else ""
        raise GptError(f'{where}: answer must be "1" or "2" (the option that fills the blank), not '
                       f"{shown(answer)}{hint}.")
    contexts = (sentence[:blank] + first, sentence[:blank] + second)
    continuation = " " + sentence[blank + 1:].strip()
    return Example(index, sentence[:blank], (continuation, continuation), contexts, int(answer) - 1, where,
                   contexts=contexts)


# --- SciQ (Welbl et al. 2017) -------------------------------------------------------------------------------


def sciq_example(record: dict, index: int, where: str) -> Example:
    """"{support, its leading whitespace stripped}\\nQuestion: {question}\\nAnswer:"; the choices distractor1,
    distractor2, distractor3, correct_answer; gold = 3 (the correct answer is always last, as lm-eval has it)."""
    support, question = text_field(record, "support", where), text_field(record, "question", where)
    choices = [text_field(record, key, where) for key in ("distractor1", "distractor2", "distractor3",
                                                          "correct_answer")]
    return choice_example(index, f"{support.lstrip()}\nQuestion: {question}\nAnswer:", choices, 3, where)


# --- BoolQ (Clark et al. 2019, in SuperGLUE) ----------------------------------------------------------------


def boolq_example(record: dict, index: int, where: str) -> Example:
    """"{passage}\\nQuestion: {question}?\\nAnswer:"; the choices "no", "yes"; gold = label (1 is yes)."""
    passage, question = text_field(record, "passage", where), text_field(record, "question", where)
    gold = label_index(record, "label", where, 2, "0 (no) or 1 (yes)")
    return choice_example(index, f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], gold, where)


def multiple_choice(name: str, title: str, hub: tuple[str, Optional[str], str], fields: tuple[str, ...], example,
                    norm: bool = True) -> Benchmark:
    """A task scored by its choices' log-likelihoods: acc and, with `norm`, acc_norm (the headline then)."""
    return Benchmark(name=name, title=title, hub=hub, fields=fields, example=example,
                     outcomes=choice_outcomes if norm else accuracy,
                     metrics=dict(ACC_AND_NORM if norm else ACC),
                     higher_is_better={metric: True for metric in (ACC_AND_NORM if norm else ACC)},
                     headline="acc_norm" if norm else "acc")


ARC_FIELDS = ("question", "choices", "answerKey")
PIQA = multiple_choice("piqa", "PIQA", ("baber/piqa", None, "validation"), ("goal", "sol1", "sol2", "label"),
                       piqa_example)
ARC_EASY = multiple_choice("arc_easy", "ARC-Easy", ("allenai/ai2_arc", "ARC-Easy", "test"), ARC_FIELDS, arc_example)
ARC_CHALLENGE = multiple_choice("arc_challenge", "ARC-Challenge", ("allenai/ai2_arc", "ARC-Challenge", "test"),
                                ARC_FIELDS, arc_example)
WINOGRANDE = multiple_choice("winogrande", "WinoGrande", ("allenai/winogrande", "winogrande_xl", "validation"),
                             ("sentence", "option1", "option2", "answer"), winogrande_example, norm=False)
OPENBOOKQA = multiple_choice("openbookqa", "OpenBookQA", ("allenai/openbookqa", "main", "test"),
                             ("question_stem", "choices", "answerKey"), openbookqa_example)
SCIQ = multiple_choice("sciq", "SciQ", ("allenai/sciq", None, "test"),
                       ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
                       sciq_example)
BOOLQ = multiple_choice("boolq", "BoolQ", ("aps/super_glue", "boolq", "validation"), ("passage", "question", "label"),
                        boolq_example, norm=False)
