"""The zero-shot suite beside HellaSwag and LAMBADA (gptcli.tasks.multiple_choice): PIQA, ARC-Easy,
ARC-Challenge, WinoGrande, OpenBookQA, SciQ and BoolQ scored as lm-evaluation-harness 0.4 scores them, the
groups `all` and `ai2_arc`, and the one table `gpt eval --task all` prints.

The fast tests hold each definition to lm-eval's own (its installed YAML and utils, reading the same local
file in the Hub's layout: every request, choice and gold index equal) and the packed scorer to one forward
pass per request, WinoGrande's contexts-that-differ included. The slow test runs lm-eval's evaluator with its
`hf` backend on the `export-hf` copy of a model: every log-likelihood within 1e-4, every accuracy identical,
every standard error equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptcli.errors import GptError
from gptcli.presets import PRESETS
from gptcli.tasks import evaluate_tasks, read_all
from gptcli.tasks.benchmarks import benchmark
from gptcli.tasks.data import read_examples
from gptcli.tasks.scoring import encode_example, pack, score_groups
from task_files import HELLASWAG, LAMBADA, LM_EVAL_YAML, PIQA, lm_eval_task, random_model, write_jsonl, write_parquet

LOGLIKELIHOOD_TOLERANCE = 1e-4  # the bound against lm-eval; fp32 sums of ~20 log-probabilities
SUITE = ("piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "sciq", "boolq")

# Records in each Hub dataset's layout, short enough for the 128-position model, with what the definitions
# must get right: ARC's numeric labels and 3- or 5-choice questions, OpenBookQA's answerKey with a leading
# space, WinoGrande's blank at the start, before punctuation and after a space, SciQ's support with leading
# whitespace or none, choices that start alike (they share rows of the packed prefix tree), unicode.
RECORDS = {
    "piqa": PIQA,
    "arc": [
        {"id": "q1", "question": "Which gas do plants take in from the air?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "q2", "question": "What makes ice melt fastest on a road?",
         "choices": {"text": ["salt", "sand", "sugar"], "label": ["1", "2", "3"]}, "answerKey": "1"},
        {"id": "q3", "question": "Which is a mammal?",
         "choices": {"text": ["a shark", "a whale", "a trout", "a tuna", "a squid"], "label": ["A", "B", "C", "D", "E"]},
         "answerKey": "B"},
        {"id": "q4", "question": "Water boils at sea level at",
         "choices": {"text": ["100 degrees", "10 degrees", "1 degree", "0 degrees"], "label": ["1", "2", "3", "4"]},
         "answerKey": "1"},
        {"id": "q5", "question": "A magnet attracts",
         "choices": {"text": ["iron nails", "iron bars", "glass", "paper"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
    ],
    "winogrande": [
        {"sentence": "The trophy does not fit in the case because the _ is too big.", "option1": "trophy",
         "option2": "case", "answer": "1"},
        {"sentence": "_ went to the shop because Maria asked her to.", "option1": "Anna", "option2": "Maria",
         "answer": "1"},
        {"sentence": "Sam gave the book to Alex because _.", "option1": "Sam", "option2": "Alex", "answer": "2"},
        {"sentence": "The soup was colder than the tea, so the _ was drunk first.", "option1": "soup",
         "option2": "tea", "answer": "2"},
        {"sentence": "Kim could lift the box but not the piano, as the _ was heavy.", "option1": "box",
         "option2": "piano", "answer": "2"},
    ],
    "openbookqa": [
        {"id": "o1", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "plants sprouting and wilting", "the moon's shape",
                              "rain on Mars"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "o2", "question_stem": "A rock is likely to",
         "choices": {"text": ["sink in water", "float on air", "sing a song", "grow leaves"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": " A"},
        {"id": "o3", "question_stem": "Which is a conductor?",
         "choices": {"text": ["a copper wire", "a copper coin", "a rubber band", "a wool hat"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ],
    "sciq": [
        {"question": "What do plants make in photosynthesis?", "distractor3": "salt", "distractor1": "iron",
         "distractor2": "sand", "correct_answer": "sugar", "support": "  Plants use light to make sugar."},
        {"question": "What is H2O?", "distractor3": "air", "distractor1": "fire", "distractor2": "earth",
         "correct_answer": "water", "support": ""},
        {"question": "What pulls objects toward Earth?", "distractor3": "magnetism", "distractor1": "friction",
         "distractor2": "light", "correct_answer": "gravity", "support": "\nGravity pulls every mass."},
        {"question": "Which organ pumps blood?", "distractor3": "the lung", "distractor1": "the liver",
         "distractor2": "the skin", "correct_answer": "the heart", "support": "The heart is a muscle."},
    ],
    "boolq": [
        {"question": "is the sky blue", "passage": "The sky appears blue because air scatters blue light.", "idx": 0,
         "label": 1},
        {"question": "do fish fly", "passage": "Fish swim in water and breathe through gills.", "idx": 1, "label": 0},
        {"question": "is paris in france", "passage": "Paris is the capital of France.", "idx": 2, "label": 1},
        {"question": "can ice be hot", "passage": "Ice is frozen water; it melts above zero degrees.", "idx": 3,
         "label": 0},
    ],
}
RECORDS_OF = {"piqa": "piqa", "arc_easy": "arc", "arc_challenge": "arc", "winogrande": "winogrande",
              "openbookqa": "openbookqa", "sciq": "sciq", "boolq": "boolq"}


@pytest.fixture(scope="module")
def tokenizer():
    from gptcli.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("suite")
    written = {name: write_jsonl(directory / f"{name}.jsonl", RECORDS[RECORDS_OF[name]]) for name in SUITE}
    written["hellaswag"] = write_jsonl(directory / "hellaswag.jsonl", HELLASWAG)
    written["lambada"] = write_jsonl(directory / "lambada.jsonl", [{"text": text} for text in LAMBADA])
    return written


# --- the definitions against lm-eval's own ------------------------------------------------------------------


@pytest.mark.parametrize("name", SUITE)
def test_every_request_choice_and_gold_is_lm_evals(name, files, tmp_path):
    """lm-eval's zero-shot context, its requests (context, continuation) for each choice, its choices (what
    acc_norm divides by) and its gold index, from its own task definition on the same file."""
    task = lm_eval_task(name, files[name], tmp_path / "cache")
    examples, _ = read_examples(benchmark(name), files[name])
    docs = list(task.eval_docs)
    assert len(examples) == len(docs) == len(RECORDS[RECORDS_OF[name]])
    for doc, example in zip(docs, examples, strict=True):
        requests = task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=(name, 0, 1))
        assert example.requests() == [tuple(request.args) for request in requests]
        assert list(example.choices) == task.doc_to_choice(doc)
        assert example.gold == (task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc))
    assert set(benchmark(name).metrics) == set(task._metric_fn_list)  # acc, and acc_norm where lm-eval has it


def test_the_hubs_parquet_layout_gives_the_same_examples(files, tmp_path):
    """ARC's and OpenBookQA's `choices` is a struct in the Hub's Parquet files: a dict per row, as in JSONL."""
    for name in ("arc_easy", "openbookqa"):
        parquet = write_parquet(tmp_path / f"{name}.parquet", RECORDS[RECORDS_OF[name]])
        assert read_examples(benchmark(name), parquet)[0] == read_examples(benchmark(name), files[name])[0]


def test_each_task_reads_the_hub_dataset_and_split_lm_eval_scores():
    """The dataset lm-eval's YAML names, and the split it evaluates: test where it names one, else validation."""
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")

    for name in SUITE:
        path = Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name]
        config = yaml.load(path.read_text(), Loader=yaml.BaseLoader)  # the !function tags as plain text
        if "include" in config:  # arc_challenge: arc_easy's definition with its own dataset_name
            config = {**yaml.load((path.parent / config.pop("include")).read_text(), Loader=yaml.BaseLoader),
                      **config}
        dataset_name = None if config.get("dataset_name") in (None, "null") else config["dataset_name"]
        split = config.get("test_split") if config.get("test_split") not in (None, "null") else config["validation_split"]
        assert benchmark(name).hub == (config["dataset_path"], dataset_name, split), name


# --- packing: one forward pass per request ------------------------------------------------------------------


def separate_passes(model, group) -> list[tuple[float, bool]]:
    """What lm-eval's hf backend computes for each request: a forward pass over context + continuation minus
    its last token, log-softmax in fp32, the continuation's log-probabilities summed (only the positions that
    predict it are projected to the vocabulary: the same numbers, less time)."""
    results = []
    for context, continuation in group.requests:
        with torch.no_grad():
            hidden = model.hidden_states(torch.tensor([context + continuation[:-1]]))  # (1, T, C), causal
            logits = model.head(hidden[0, len(context) - 1:])  # (len(continuation), V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation)
        results.append((logprobs[torch.arange(len(continuation)), target].sum().item(),
                        bool((logprobs.argmax(-1) == target).all())))
    return results


@pytest.mark.parametrize("name", SUITE)
def test_packed_scores_equal_one_forward_pass_per_request(model, tokenizer, files, name):
    examples, _ = read_examples(benchmark(name), files[name], limit=3)  # in one batch and across two
    groups = [encode_example(tokenizer, e, model.config.block_size) for e in examples]
    for group, scored in zip(groups, score_groups(model, groups, batch_size=2), strict=True):
        expected = separate_passes(model, group)
        assert [s.greedy for s in scored] == [greedy for _, greedy in expected]
        for s, (loglikelihood, _) in zip(scored, expected, strict=True):
            # fp32 sums of up to ~60 nats: a few ulps of the sum apart
            assert s.loglikelihood == pytest.approx(loglikelihood, rel=2e-7, abs=LOGLIKELIHOOD_TOLERANCE / 10)


def test_winogrande_shares_the_sentence_before_the_blank_and_scores_the_rest_once_per_option(tokenizer, files):
    """The other way round: the two requests differ in their contexts (the option) and share the continuation.
    The packed row holds the sentence's start once; the continuation's tokens twice, after each option."""
    examples, _ = read_examples(benchmark("winogrande"), files["winogrande"])
    trophy = encode_example(tokenizer, examples[0], 128)  # "The trophy ... because the _ is too big."
    (first, continuation), (second, same) = trophy.requests
    assert continuation == same == tokenizer.encode(" is too big.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    packed = pack(trophy)
    inputs = len(first) + len(second) + 2 * (len(continuation) - 1)
    assert len(packed.tokens) == inputs - shared  # the shared start once
    assert shared == len(tokenizer.encode("The trophy does not fit in the case because the"))
    blank_first = encode_example(tokenizer, examples[1], 128)  # "_ went ...": nothing shared
    assert len(pack(blank_first).tokens) == sum(len(c) + len(t) - 1 for c, t in blank_first.requests)


def test_the_choices_of_one_context_share_it_in_the_packed_row(tokenizer, files):
    """PIQA's goal, ARC's question, SciQ's support and question, BoolQ's passage: run once per example."""
    for name in SUITE:
        if name == "winogrande":
            continue
        for example in read_examples(benchmark(name), files[name])[0]:
            group = encode_example(tokenizer, example, 128)
            context = group.requests[0][0]
            assert all(c is context for c, _ in group.requests)  # one encoding of the context
            assert len(pack(group).tokens) <= len(context) + sum(len(t) - 1 for t in group.continuations)


# --- errors: what and where -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, edit, fragment", [
    ("piqa", lambda r: r.update(label=2), "line 2: label must be 0 (sol1) or 1 (sol2), not 2"),
    ("piqa", lambda r: r.update(label=-1), "line 2: label must be 0 (sol1) or 1 (sol2), not -1"),
    ("arc_easy", lambda r: r.update(answerKey="E"), "line 2: answerKey 'E' is not one of the choices' labels (1, 2, 3)"),
    ("arc_challenge", lambda r: r.update(choices={"text": ["a"], "label": []}), "line 2: choices must be"),
    ("arc_easy", lambda r: r.pop("answerKey"), "line 2 has no field 'answerKey'"),
    ("winogrande", lambda r: r.update(sentence="No blank here."), 'line 2: sentence has no blank "_"'),
    ("winogrande", lambda r: r.update(answer=""), "the test split has no answers"),
    ("winogrande", lambda r: r.update(answer=1), 'line 2: answer must be "1" or "2"'),
    ("openbookqa", lambda r: r.update(question_stem=None), "line 2: question_stem must be text, not None"),
    ("sciq", lambda r: r.update(correct_answer=4), "line 2: correct_answer must be text, not 4"),
    ("boolq", lambda r: r.update(label=True), "line 2: label must be 0 (no) or 1 (yes), not True"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, name, edit, fragment):
    records = json.loads(json.dumps(RECORDS[RECORDS_OF[name]][:3]))
    edit(records[1])
    with pytest.raises(GptError) as error:
        read_examples(benchmark(name), write_jsonl(tmp_path / "bad.jsonl", records))
    assert fragment in str(error.value) and "bad.jsonl" in str(error.value)


# --- groups and the one table -----------------------------------------------------------------------------------


def test_all_and_ai2_arc_name_the_suite_in_a_project_and_training_reads_them_all(files, tokenizer):
    from gptcli.config import ConfigError, project_from_dict
    from gptcli.registry import TASKS
    from gptcli.train.observing.task_eval import prepare

    everything = ["hellaswag", "lambada", *SUITE]
    assert project_from_dict({"eval": {"tasks": ["all"]}}).eval.tasks == everything == list(TASKS.builtins)
    assert project_from_dict({"eval": {"tasks": ["ai2_arc"]}}).eval.tasks == ["arc_easy", "arc_challenge"]
    assert project_from_dict({"eval": {"tasks": ["arc_challenge", "ai2_arc", "piqa"]}}).eval.tasks == \
        ["arc_challenge", "arc_easy", "piqa"]  # a task named twice through a group is scored once
    with pytest.raises(ConfigError, match=r'eval.tasks names "al", which is not a task .*\(did you mean "all"\?\)'):
        project_from_dict({"eval": {"tasks": ["al"]}})
    with pytest.raises(ConfigError, match=r'eval.task_data names "all", a group of tasks \(hellaswag, .*\); name '
                                          r"each task here"):
        project_from_dict({"eval": {"tasks": ["all"], "task_data": {"all": "x.jsonl"}}})
    project = project_from_dict({"eval": {"tasks": ["all"], "tasks_every": 10,
                                          "task_data": {name: str(path) for name, path in files.items()}}})
    task_set = prepare(project, tokenizer, 128, rank=0, world=1)
    assert [bench.name for bench in task_set.definitions()] == everything
    assert [total for _, _, total in task_set.tasks] == [len(HELLASWAG), len(LAMBADA)] + \
        [len(RECORDS[RECORDS_OF[name]]) for name in SUITE]


def test_the_table_of_all_tasks_shows_each_score_its_error_examples_and_gpt2s_published_score(capsys):
    from gptcli.cli import show_task_results
    from gptcli.tasks import TaskResult

    results = []
    for name, examples in (("hellaswag", 10042), ("piqa", 1838), ("arc_easy", 2376), ("winogrande", 1267)):
        bench = benchmark(name)
        metrics = {metric: (0.5, 0.01) for metric in bench.metrics}
        results.append(TaskResult(name, bench.title, "hub", examples, metrics, bench.higher_is_better,
                                  PRESETS["gpt2"].scores.get(name, {}), "gpt2", 1.0))
    show_task_results(results)
    shown = capsys.readouterr().out
    for fragment in ("HellaSwag", "PIQA", "ARC-Easy", "WinoGrande", "1,838", "2,376", "0.0100", "0.3114 [1]",
                     "0.6289 [2]", "0.5161 [2]", "[1] gpt2: lm-evaluation-harness", "[2] gpt2: crumb/gpt2023"):
        assert fragment in shown, fragment
    arc_row = next(line for line in shown.splitlines() if "ARC-Easy" in line)
    assert "[" not in arc_row  # nothing published for ARC-Easy measured lm-eval's way: no figure


def test_published_gpt2_scores_name_a_metric_each_task_reports():
    scores = PRESETS["gpt2"].scores
    assert {name: {m: p.value for m, p in metrics.items()} for name, metrics in scores.items() if name in SUITE} == \
        {"piqa": {"acc": 0.6289}, "winogrande": {"acc": 0.5161}, "sciq": {"acc": 0.750}}
    for name in SUITE:
        assert set(scores.get(name, {})) <= set(benchmark(name).metrics)


@pytest.mark.slow  # loads a model dir and scores nine tasks in this process (seconds)
def test_gpt_eval_task_all_prints_one_table_and_its_json_equals_the_api(files, model, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from gptcli.cli import app
    from gptcli.modeldir import save_model_dir

    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    data = [option for name, path in files.items() for option in ("--task-data", f"{name}={path}")]
    table = CliRunner().invoke(app, ["eval", "--checkpoint", str(model_dir), "--task", "all", *data])
    assert table.exit_code == 0, (table.output, table.exception)
    for name in ("hellaswag", "lambada", *SUITE):
        assert benchmark(name).title in table.stdout
    assert "nothing to compare with" in " ".join(table.stdout.split())  # a random 2-layer model is no GPT-2 size
    some = {name: str(files[name]) for name in ("arc_easy", "arc_challenge", "winogrande")}
    report = CliRunner().invoke(app, ["eval", "--checkpoint", str(model_dir), "--task", "ai2_arc,winogrande", "--json",
                                      *[o for name, path in some.items() for o in ("--task-data", f"{name}={path}")]])
    assert report.exit_code == 0, (report.output, report.exception)
    tasks = json.loads(report.stdout)["tasks"]
    expected = {r.name: r for r in evaluate_tasks(model, tokenizer, read_all(list(some), some, 0), batch_size=8)}
    assert list(tasks) == list(expected)
    for name, result in expected.items():
        assert tasks[name]["examples"] == result.examples
        for metric, (value, stderr) in result.metrics.items():
            assert tasks[name]["metrics"][metric]["value"] == pytest.approx(value, rel=1e-6)
            assert tasks[name]["metrics"][metric]["stderr"] == pytest.approx(stderr, rel=1e-6)


# --- against lm-evaluation-harness itself -----------------------------------------------------------------------


@pytest.mark.slow  # lm-eval's evaluator with its hf backend, seven tasks
def test_every_loglikelihood_accuracy_and_standard_error_equals_lm_evaluation_harness(model, tokenizer, files,
                                                                                     tmp_path, monkeypatch):
    """lm-eval's evaluator with its HFLM on the `export-hf` copy of the model, its own task definitions reading
    the same files: per-request log-likelihoods within 1e-4, greedy flags, per-example outcomes, the metrics
    identical and their standard errors equal."""
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from gptcli.hf.export import export_hf
    from gptcli.modeldir import save_model_dir

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    export_hf(save_model_dir(tmp_path / "model", model, tokenizer), tmp_path / "hf")
    lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4)
    tasks = {f"{name}_local": lm_eval_task(name, files[name], tmp_path / "cache") for name in SUITE}
    reference = evaluator.evaluate(lm, tasks, log_samples=True, verbosity="ERROR")
    ours = {r.name: r for r in evaluate_tasks(model, tokenizer, read_all(
        list(SUITE), {name: str(files[name]) for name in SUITE}, 0), batch_size=4)}
    for name, result in ours.items():
        samples = sorted(reference["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(samples) == result.examples
        examples, _ = read_examples(benchmark(name), files[name])
        for sample, example, scored in zip(samples, examples, result.scores, strict=True):
            expected = [tuple(r) for r in sample["filtered_resps"]]
            assert [s.greedy for s in scored] == [greedy for _, greedy in expected]
            assert [s.loglikelihood for s in scored] == pytest.approx([ll for ll, _ in expected],
                                                                      abs=LOGLIKELIHOOD_TOLERANCE)
            outcomes = benchmark(name).outcomes(example, scored)
            assert outcomes == {metric: sample[metric] for metric in outcomes}
        metrics = reference["results"][f"{name}_local"]
        for metric, (value, stderr) in result.metrics.items():
            assert value == metrics[f"{metric},none"], (name, metric)
            assert stderr == pytest.approx(metrics[f"{metric}_stderr,none"], rel=1e-12), (name, metric)
    assert any(0 < value < 1 for r in ours.values() for value, _ in r.metrics.values())  # not all trivially 0 or 1
