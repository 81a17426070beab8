"""`gpt eval --task`: HellaSwag and LAMBADA scored as lm-evaluation-harness 0.4 scores them, and a plugin's
task (examples/plugins: PIQA) found through the registry by its entry point or as "file.py:attr".

The fast tests check each piece against lm-eval's own definitions (its HellaSwag preprocessing function,
its LAMBADA templates, its pair encoding, its standard errors) and the packed scorer against one plain
forward pass per request, which is what lm-eval's `hf` backend runs. The slow test runs lm-eval itself
(HFLM on the `gpt export-hf` copy of the model, its own task definitions reading the same files) and
compares every log-likelihood (within 1e-4) and every accuracy (equal).
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_gpt
from gptcli.errors import GptError, Stopped
from gptcli.presets import PRESETS
from gptcli.tasks import evaluate_tasks, gpt2_shape, read_all, stats
from gptcli.tasks.benchmarks import benchmark
from gptcli.tasks.data import read_examples
from gptcli.tasks.scoring import encode_example, encode_pair, score_groups
from task_files import HELLASWAG, LAMBADA, PIQA, greedy_passages, lm_eval_task, random_model, write_jsonl, write_parquet

LOGLIKELIHOOD_TOLERANCE = 1e-4  # the bound against lm-eval; fp32 sums of ~20 log-probabilities
# The same model's scores packed in rows and one request per forward pass: fp32 sums of up to ~100 nats whose
# terms come from matrix products of other shapes, so they differ by a few ulps of the sum (fp32's ulp is 7.6e-6
# between 64 and 128; -97.528630 against -97.528641 was seen on one machine): within 1e-6 of their size (about
# 13 ulps), and 1e-5 for sums near 0.
PACKED_RELATIVE, PACKED_ABSOLUTE = 1e-6, 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    from gptcli.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, tokenizer) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tasks")
    passages = LAMBADA + greedy_passages(model, tokenizer)
    return {"hellaswag": write_jsonl(directory / "hellaswag.jsonl", HELLASWAG),
            "lambada": write_jsonl(directory / "lambada.jsonl", [{"text": t} for t in passages])}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    from gptcli.modeldir import save_model_dir

    return save_model_dir(tmp_path_factory.mktemp("task-model") / "model", model, tokenizer)


def score(model, tokenizer, files, names=("hellaswag", "lambada"), **options):
    tasks = read_all(list(names), {name: str(files[name]) for name in names}, options.pop("limit", 0))
    return {r.name: r for r in evaluate_tasks(model, tokenizer, tasks, **options)}


# --- the definitions against lm-eval's own ------------------------------------------------------------------


def lm_eval_file(relative: str) -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm_eval is not installed (pip install -e .[test])")
    return Path(spec.origin).parent / relative


def test_hellaswag_examples_are_lm_evals_processed_docs(files):
    """lm-eval's process_docs (loaded from its file) on the same records: query, choices and gold."""
    import datasets

    path = lm_eval_file("tasks/hellaswag/utils.py")
    spec = importlib.util.spec_from_file_location("lm_eval_hellaswag_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = utils.process_docs(datasets.Dataset.from_list(HELLASWAG)).to_list()
    examples, _ = read_examples(benchmark("hellaswag"), files["hellaswag"])
    assert [e.context for e in examples] == [d["query"] for d in docs]
    assert [list(e.choices) for e in examples] == [d["choices"] for d in docs]
    assert [list(e.continuations) for e in examples] == [[" " + c for c in d["choices"]] for d in docs]
    assert [e.gold for e in examples] == [d["gold"] for d in docs]
    assert examples[7].context.endswith(". ")  # " [title]" at the end: a trailing space lm-eval keeps


def test_lambada_examples_are_lm_evals_templates(files):
    """The context and target templates of lm-eval's lambada_openai.yaml, rendered by lm-eval."""
    import yaml

    apply_template = pytest.importorskip("lm_eval.utils").apply_template

    config = yaml.safe_load(lm_eval_file("tasks/lambada/lambada_openai.yaml").read_text())
    examples, _ = read_examples(benchmark("lambada"), files["lambada"])
    records = [json.loads(line) for line in files["lambada"].read_text().splitlines()]
    assert [e.context for e in examples] == [apply_template(config["doc_to_text"], r) for r in records]
    assert [e.continuations[0] for e in examples] == [apply_template(config["doc_to_target"], r) for r in records]
    assert examples[1].context.endswith(" ") and examples[3].context == ""


@pytest.mark.parametrize("context, continuation", [
    ("The cat sat on the", " mat"), ("The cat sat on the ", " mat"), ("A b  ", " c"), ("Tab\t", " x"),
    ("Numbers 12", "34"), ("Quote '", "s"), ("Unicode café", " crème"), ("x", "\n\ny")])
def test_pairs_split_as_lm_evals_encode_pair(tokenizer, context, continuation):
    """lm-eval's TemplateLM._encode_pair itself, run with the same tokenizer."""
    from types import SimpleNamespace

    TemplateLM = pytest.importorskip("lm_eval.api.model").TemplateLM

    lm = SimpleNamespace(backend="causal", tok_encode=lambda text, **kwargs: tokenizer.encode(text))
    assert encode_pair(tokenizer, context, continuation) == TemplateLM._encode_pair(lm, context, continuation)


def test_empty_context_is_end_of_text_as_lm_evals_prefix_token(tokenizer):
    assert encode_pair(tokenizer, "", " Hello") == ([tokenizer.eot_id], tokenizer.encode(" Hello"))


def test_standard_errors_are_lm_evals(monkeypatch):
    """mean_stderr exactly; the perplexity bootstrap draws lm-eval's very resamples (equal to 1e-12)."""
    import random

    metrics = pytest.importorskip("lm_eval.api.metrics")

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's single-process path: the same seeds
    draw = random.Random(3)
    accuracies = [float(draw.random() < 0.3) for _ in range(57)]
    loglikelihoods = [-draw.random() * 12 for _ in range(333)]
    assert stats.mean_stderr(accuracies) == metrics.mean_stderr(accuracies)
    assert stats.perplexity(loglikelihoods) == metrics.perplexity(loglikelihoods)
    ours = stats.bootstrap_perplexity_stderr(loglikelihoods, iterations=2000)
    assert ours == pytest.approx(metrics.bootstrap_stderr(metrics.perplexity, loglikelihoods, 2000), rel=1e-12)
    assert stats.mean_stderr([1.0]) is None and stats.bootstrap_perplexity_stderr([-1.0]) is None


# --- the packed scorer against one forward pass per request -------------------------------------------------


def separate_passes(model, group) -> list[tuple[float, bool]]:
    """What lm-eval's hf backend computes for each request: a forward pass over context + continuation
    minus its last token, log-softmax in fp32, the continuation's log-probabilities summed."""
    results = []
    for continuation in group.continuations:
        ids = torch.tensor([group.context + continuation[:-1]])
        with torch.no_grad():
            logits, _ = model(ids)
        logprobs = torch.log_softmax(logits[0, len(group.context) - 1:].float(), dim=-1)
        target = torch.tensor(continuation)
        results.append((logprobs[torch.arange(len(continuation)), target].sum().item(),
                        bool((logprobs.argmax(-1) == target).all())))
    return results


@pytest.mark.parametrize("name, batch_size", [("hellaswag", 3), ("lambada", 2)])
def test_packed_scores_equal_one_forward_pass_per_request(model, tokenizer, files, name, batch_size):
    bench = benchmark(name)
    examples, source = read_examples(bench, files[name])
    groups = [encode_example(tokenizer, e, model.config.block_size) for e in examples]
    scores = score_groups(model, groups, batch_size)
    for group, scored in zip(groups, scores, strict=True):
        expected = separate_passes(model, group)
        assert [s.greedy for s in scored] == [greedy for _, greedy in expected]
        for s, (loglikelihood, _) in zip(scored, expected, strict=True):
            assert s.loglikelihood == pytest.approx(loglikelihood, rel=PACKED_RELATIVE, abs=PACKED_ABSOLUTE)
    if name == "lambada":
        assert any(s[0].greedy for s in scores)  # the greedy passages: acc is not trivially 0


def test_the_whole_forward_path_gives_the_same_scores(model, tokenizer, files):
    """ZeRO-3 training calls the model whole (all positions projected): the same numbers."""
    bench = benchmark("hellaswag")
    examples, source = read_examples(bench, files["hellaswag"])
    groups = [encode_example(tokenizer, e, model.config.block_size) for e in examples]
    rows = score_groups(model, groups, 4)
    whole = score_groups(model, groups, 4, full_forward=True, min_batches=5)
    for a, b in zip(rows, whole, strict=True):
        assert [s.greedy for s in a] == [s.greedy for s in b]
        assert [s.loglikelihood for s in a] == pytest.approx([s.loglikelihood for s in b], rel=PACKED_RELATIVE,
                                                             abs=PACKED_ABSOLUTE)


def test_metrics_follow_from_the_scores(model, tokenizer, files):
    results = score(model, tokenizer, files, batch_size=4)
    hellaswag, lambada = results["hellaswag"], results["lambada"]
    examples, _ = read_examples(benchmark("hellaswag"), files["hellaswag"])
    acc = [float(max(range(len(s)), key=lambda i: (s[i].loglikelihood, -i)) == e.gold)
           for e, s in zip(examples, hellaswag.scores, strict=True)]
    assert hellaswag.metrics["acc"] == (sum(acc) / len(acc), stats.mean_stderr(acc))
    loglikelihoods = [s[0].loglikelihood for s in lambada.scores]
    assert lambada.metrics["perplexity"][0] == pytest.approx(math.exp(-sum(loglikelihoods) / len(loglikelihoods)))
    assert lambada.metrics["acc"][0] == sum(s[0].greedy for s in lambada.scores) / len(lambada.scores)
    assert hellaswag.examples == len(HELLASWAG) and hellaswag.shape is None and hellaswag.published == {}


def test_parquet_and_integer_labels_give_the_same_examples(tmp_path, files):
    """The Hub's Parquet layout, and the original HellaSwag JSONL's integer labels."""
    expected = read_examples(benchmark("hellaswag"), files["hellaswag"])[0]
    assert read_examples(benchmark("hellaswag"), write_parquet(tmp_path / "hellaswag.parquet", HELLASWAG))[0] == expected
    integers = write_jsonl(tmp_path / "integers.jsonl", [dict(r, label=int(r["label"])) for r in HELLASWAG])
    assert read_examples(benchmark("hellaswag"), integers)[0] == expected


def test_limit_scores_the_first_examples(model, tokenizer, files):
    limited = score(model, tokenizer, files, names=("hellaswag",), limit=3)["hellaswag"]
    whole = score(model, tokenizer, files, names=("hellaswag",))["hellaswag"]
    assert limited.examples == 3 and limited.scores == whole.scores[:3]


def test_gpt2_sizes_are_recognised_and_get_their_published_scores():
    from gptcli.config import project_from_dict

    assert gpt2_shape(project_from_dict({"model": {"preset": "gpt2"}}).model) == "gpt2"
    assert gpt2_shape(project_from_dict({"model": {"preset": "gpt2-xl"}}).model) == "gpt2-xl"
    unnamed = project_from_dict({"model": {"n_layer": 12, "n_head": 12, "n_embd": 768}}).model  # no preset name
    assert gpt2_shape(unnamed) == "gpt2"
    assert gpt2_shape(project_from_dict({"model": {"preset": "gpt2", "n_layer": 6}}).model) is None  # distilgpt2's
    medium = {"preset": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024}  # named gpt2, shaped as gpt2-medium
    assert gpt2_shape(project_from_dict({"model": medium}).model) == "gpt2-medium"
    assert gpt2_shape(project_from_dict({"model": {"preset": "nano"}}).model) is None
    assert PRESETS["gpt2"].scores["hellaswag"]["acc_norm"].value == 0.3114
    assert PRESETS["gpt2"].scores["lambada"]["perplexity"].value == 40.0554
    assert PRESETS["gpt2-xl"].scores["lambada"]["acc"].value == 0.6324 and "hellaswag" not in PRESETS["gpt2-xl"].scores


def test_published_scores_are_the_presets_for_every_task_a_preset_names():
    """One home for a published score: each is a preset's, under a task and a metric the task reports."""
    scored = {name: preset.scores for name, preset in PRESETS.items() if preset.scores}
    assert set(scored) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    for scores in scored.values():
        for task, metrics in scores.items():
            assert set(metrics) <= set(benchmark(task).metrics)
    assert not any(hasattr(benchmark(name), "published") for name in ("hellaswag", "lambada"))


def test_the_built_in_tasks_are_the_registrys_and_their_names_are_their_record_names():
    from gptcli.registry import TASKS
    from gptcli.tasks.benchmarks import HELLASWAG, LAMBADA

    assert [benchmark(name) for name in TASKS.builtins] == [HELLASWAG, LAMBADA]
    assert [task.name for task in (HELLASWAG, LAMBADA)] == list(TASKS.builtins)


def test_an_object_that_is_not_a_task_is_one_sentence(tmp_path):
    (tmp_path / "mine.py").write_text("from gptcli.tasks.benchmarks import HELLASWAG\nNOT_A_TASK = 3\n"
                                      "import dataclasses\n"
                                      "ODD = dataclasses.replace(HELLASWAG, metrics={'acc': 'median:acc'})\n")
    with pytest.raises(GptError, match=r'eval.tasks = "mine.py:NOT_A_TASK" is not a task: it has no name, title, '):
        benchmark("mine.py:NOT_A_TASK", tmp_path)
    with pytest.raises(GptError, match=r'each metric must be "mean:<outcome>" or "perplexity:<outcome>", not '
                                       r"acc = 'median:acc'"):
        benchmark("mine.py:ODD", tmp_path)


# --- errors: what and where -----------------------------------------------------------------------------------


def hellaswag_file(tmp_path: Path, records: list[dict]) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", records)


@pytest.mark.parametrize("edit, fragments", [
    (lambda r: r.pop("ctx_b"), ["line 2 has no field 'ctx_b'", "need activity_label, ctx_a, ctx_b, endings, label"]),
    (lambda r: r.update(label="7"), ["line 2: label '7' is not the index of one of its 4 endings"]),
    (lambda r: r.update(label=""), ["line 2: label ''", "the test split has no labels"]),
    (lambda r: r.update(endings="one ending"), ["line 2: endings must be a non-empty list of strings"]),
    (lambda r: r.update(ctx_a=3), ["line 2: ctx_a must be text, not 3"]),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, edit, fragments):
    records = json.loads(json.dumps(HELLASWAG[:3]))
    edit(records[1])
    with pytest.raises(GptError) as error:
        read_examples(benchmark("hellaswag"), hellaswag_file(tmp_path, records))
    for fragment in fragments:
        assert fragment in str(error.value)


def test_file_errors_are_one_sentence(tmp_path):
    bench = benchmark("lambada")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n')
    cases = {"empty.jsonl": "holds no examples", "broken.jsonl": "line 2 is not JSON", "data.csv": "must be a .jsonl",
             "missing.jsonl": "does not exist", "blank.jsonl": "line 1: text is empty"}
    for name, fragment in cases.items():
        with pytest.raises(GptError, match=fragment):
            read_examples(bench, tmp_path / name)


def test_an_example_longer_than_the_context_is_named(tokenizer, files):
    examples, source = read_examples(benchmark("hellaswag"), files["hellaswag"])
    with pytest.raises(GptError, match=r"hellaswag.jsonl line 1 needs 23 positions \(context 15 tokens \+ "
                                       r"continuation\), more than the model's context of 16"):
        [encode_example(tokenizer, e, 16) for e in examples]


def test_a_stop_says_how_far_each_task_got(model, tokenizer, files):
    def progress(name, done, total):
        if name == "lambada":
            raise KeyboardInterrupt

    with pytest.raises(Stopped) as stopped:
        score(model, tokenizer, files, batch_size=2, progress=progress)
    assert stopped.value.signal_number == signal.SIGINT
    assert stopped.value.where.startswith("HellaSwag finished, LAMBADA (OpenAI) stopped after 2 of ")


# --- the command ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_cli_json_equals_the_api_and_the_table_shows_every_metric(model_dir, model, tokenizer, files):
    result = run_gpt("eval", "--checkpoint", model_dir, "--task", "hellaswag,lambada", "--task-data",
                     f"hellaswag={files['hellaswag']}", "--task-data", f"lambada={files['lambada']}", "--json",
                     "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["tasks"]
    expected = score(model, tokenizer, files, batch_size=3)
    for name, task in report.items():
        assert task["examples"] == expected[name].examples
        for metric, (value, stderr) in expected[name].metrics.items():
            assert task["metrics"][metric]["value"] == pytest.approx(value, rel=1e-6)
            assert task["metrics"][metric]["stderr"] == pytest.approx(stderr, rel=1e-4)
    table = run_gpt("eval", "--checkpoint", model_dir, "--task", "lambada", "--task-data", files["lambada"],
                    "--limit", "2")
    assert table.returncode == 0, table.stderr
    assert "perplexity" in table.stdout and "acc" in table.stdout and "nothing to compare with" in table.stdout


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_cli_usage_and_data_errors(model_dir, files, tmp_path):
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, "--task", "helaswag"),
                      "eval.tasks", '"helaswag"', 'did you mean "hellaswag"')
    both = run_gpt("eval", "--checkpoint", model_dir, "--task", "hellaswag", "--text", files["lambada"])
    assert both.returncode == 2 and "not both" in both.stderr
    bare = run_gpt("eval", "--checkpoint", model_dir, "--task", "hellaswag,lambada", "--task-data", files["lambada"])
    assert bare.returncode == 2 and "NAME=FILE" in bare.stderr
    assert_user_error(run_gpt("eval", "--checkpoint", model_dir, "--task", "lambada", "--task-data",
                              f"hellaswag={files['hellaswag']}"), "not among the tasks scored")


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_without_data_and_without_the_hub_the_error_says_what_to_do(model_dir, tmp_path):
    """The default case on this machine: no network, nothing cached."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # a port nothing listens on
    result = run_gpt("eval", "--checkpoint", model_dir, "--task", "hellaswag", env=env)
    assert_user_error(result, "Rowan/hellaswag (validation)", "not in the datasets cache", "--task-data FILE")
    assert len(result.stderr.strip().splitlines()) == 1


# --- a plugin's task -------------------------------------------------------------------------------------------

def piqa_by_hand(model, tokenizer) -> dict[str, float]:
    """acc and acc_norm of the PIQA records computed directly: "Question: {goal}\nAnswer:" and each " sol" as
    lm-eval splits such a pair (the context's tokens, then the rest), one forward pass per solution."""
    right = {"acc": 0, "acc_norm": 0}
    for record in PIQA:
        context = f"Question: {record['goal']}\nAnswer:"
        context_ids = tokenizer.encode(context)
        loglikelihoods = []
        for solution in (record["sol1"], record["sol2"]):
            ids = tokenizer.encode(f"{context} {solution}")
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[:-1]]))
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            positions = range(len(context_ids) - 1, len(ids) - 1)
            loglikelihoods.append(sum(logprobs[p, ids[p + 1]].item() for p in positions))
        normalised = [value / len(solution) for value, solution in zip(loglikelihoods, (record["sol1"], record["sol2"]), strict=True)]
        right["acc"] += loglikelihoods.index(max(loglikelihoods)) == record["label"]
        right["acc_norm"] += normalised.index(max(normalised)) == record["label"]
    return {metric: count / len(PIQA) for metric, count in right.items()}


def eval_in_process(*args) -> dict:
    """`gpt eval ... --json` in this process: its JSON report."""
    from typer.testing import CliRunner

    from gptcli.cli import app

    result = CliRunner().invoke(app, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


@pytest.mark.slow  # pip installs examples/plugins once (seconds), then loads the model twice
def test_a_plugins_task_by_its_entry_point_and_as_a_file_scores_what_a_direct_computation_gives(
        installed_plugins, model, model_dir, tokenizer, tmp_path):
    """examples/plugins' PIQA task, installed (its entry point's name) and as "file.py:attr" beside the project
    file, on local data: the accuracies of one forward pass per solution (equal: each is a count over 6
    records; the scores agree to 1e-5, far inside any gap between two solutions here)."""
    data = write_jsonl(tmp_path / "piqa.jsonl", PIQA)
    want = piqa_by_hand(model, tokenizer)
    installed = eval_in_process("--checkpoint", model_dir, "--task", "example_task", "--task-data", data)
    assert installed["tasks"]["piqa"]["examples"] == len(PIQA)
    assert {m: v["value"] for m, v in installed["tasks"]["piqa"]["metrics"].items()} == want
    plugin = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "gptcli_example_plugins" / "task.py"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa_task.py").write_text(plugin.read_text())
    (tmp_path / "run.toml").write_text(f'[eval]\ntask_data = {{ "tasks/piqa_task.py:TASK" = "{data}" }}\n')
    from_file = eval_in_process("--project", tmp_path / "run.toml", "--checkpoint", model_dir, "--task",
                                "tasks/piqa_task.py:TASK")
    assert from_file["tasks"]["piqa"]["metrics"] == installed["tasks"]["piqa"]["metrics"]


@pytest.mark.slow  # pip installs examples/plugins once (seconds)
def test_the_schema_takes_a_plugins_task_and_refuses_an_unknown_one_listing_the_installed(installed_plugins):
    from gptcli.config import ConfigError, project_from_dict

    assert project_from_dict({"eval": {"tasks": ["example_task"]}}).eval.tasks == ["example_task"]
    with pytest.raises(ConfigError) as error:
        project_from_dict({"eval": {"tasks": ["lambada"], "task_data": {"exampel_task": "x.jsonl"}}})
    assert str(error.value) == ('eval.task_data names "exampel_task", which is not a task (built in: hellaswag, '
                                'lambada; installed: example_task; or "package.module:attr", or "file.py:attr" '
                                'beside the project file) (did you mean "example_task"?).')


# --- against lm-evaluation-harness itself -----------------------------------------------------------------------


@pytest.mark.slow
def test_every_loglikelihood_and_accuracy_equals_lm_evaluation_harness(model_dir, model, tokenizer, files,
                                                                         tmp_path_factory, monkeypatch):
    """lm-eval's evaluator with its HFLM on the `gpt export-hf` copy, its own HellaSwag and LAMBADA task
    definitions reading the same files: per-request log-likelihoods within 1e-4, greedy flags, per-example
    acc / acc_norm and the aggregated metrics equal; standard errors as lm-eval reports them."""
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    directory = tmp_path_factory.mktemp("lm-eval")
    assert run_gpt("export-hf", model_dir, "--out", directory / "hf").returncode == 0
    lm = HFLM(pretrained=str(directory / "hf"), device="cpu", batch_size=4)
    tasks = {f"{name}_local": lm_eval_task(name, files[name], directory / "cache") for name in files}
    reference = evaluator.evaluate(lm, tasks, log_samples=True, bootstrap_iters=1000)
    ours = score(model, tokenizer, files, batch_size=4)
    for name, result in ours.items():
        samples = sorted(reference["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(samples) == result.examples
        for sample, scored in zip(samples, result.scores, strict=True):
            expected = [tuple(r) for r in sample["filtered_resps"]]
            assert [s.greedy for s in scored] == [greedy for _, greedy in expected]
            assert [s.loglikelihood for s in scored] == pytest.approx([ll for ll, _ in expected],
                                                                      abs=LOGLIKELIHOOD_TOLERANCE)
        metrics = reference["results"][f"{name}_local"]
        for metric, (value, stderr) in result.metrics.items():
            if metric == "perplexity":
                assert value == pytest.approx(metrics[f"{metric},none"], rel=1e-5)
                assert stats.bootstrap_perplexity_stderr([s[0].loglikelihood for s in result.scores], 1000) == \
                    pytest.approx(metrics[f"{metric}_stderr,none"], rel=1e-4)
            else:
                assert value == metrics[f"{metric},none"]
                assert stderr == pytest.approx(metrics[f"{metric}_stderr,none"], rel=1e-12)


def test_the_table_puts_the_published_score_beside_a_gpt2_sized_model(capsys):
    from gptcli.cli import show_task_results
    from gptcli.tasks import TaskResult

    hellaswag = benchmark("hellaswag")
    result = TaskResult("hellaswag", "HellaSwag", "Rowan/hellaswag (validation)", 10042,
                        {"acc": (0.29, 0.0045), "acc_norm": (0.3012, 0.0046)}, hellaswag.higher_is_better,
                        PRESETS["gpt2"].scores["hellaswag"], "gpt2", 1.0)
    show_task_results([result])
    shown = capsys.readouterr().out
    assert "0.3012" in shown and "0.3114 [1]" in shown and "10,042" in shown
    assert "[1] gpt2: lm-evaluation-harness" in shown
    assert result.to_json()["metrics"]["acc_norm"]["published"]["value"] == 0.3114


@pytest.mark.gpu
def test_on_a_gpu_fp32_gives_the_cpu_scores_and_bf16_is_close(model, tokenizer, files):
    """fp32 on CUDA: the CPU's log-likelihoods within 1e-4 and the same accuracies; bf16 autocast (the fast
    way on a GPU) moves each log-likelihood by bf16's rounding only."""
    cpu = score(model, tokenizer, files, batch_size=4)
    on_gpu = random_model().cuda()  # the same seed: the same weights
    gpu = score(on_gpu, tokenizer, files, batch_size=4)
    bf16 = score(on_gpu, tokenizer, files, batch_size=4, autocast=torch.autocast("cuda", dtype=torch.bfloat16))
    for name in cpu:
        assert [[s.greedy for s in e] for e in gpu[name].scores] == [[s.greedy for s in e] for e in cpu[name].scores]
        for ours, reference in zip(gpu[name].scores, cpu[name].scores, strict=True):
            assert [s.loglikelihood for s in ours] == pytest.approx([s.loglikelihood for s in reference],
                                                                   abs=LOGLIKELIHOOD_TOLERANCE)
        assert {m: v for m, (v, _) in gpu[name].metrics.items()} == pytest.approx(
            {m: v for m, (v, _) in cpu[name].metrics.items()}, rel=1e-5)
        for ours, reference in zip(bf16[name].scores, cpu[name].scores, strict=True):
            assert [s.loglikelihood for s in ours] == pytest.approx([s.loglikelihood for s in reference], rel=0.05)


def test_a_batch_that_cannot_fit_in_memory_is_one_sentence_before_scoring(model, tokenizer, files, monkeypatch):
    """machine.py's rule for every size a user types: a --batch-size whose widest batch needs more memory than
    is free is refused by name; the same batch with the memory there is scores as before."""
    import gptcli.machine

    free = 8 * 2**20  # 8 MiB: the random model's logits of all 11 passages at once need about 17 MiB, of one 2
    monkeypatch.setattr(gptcli.machine, "available_memory", lambda device="cpu": free)
    with pytest.raises(GptError, match=r"Scoring a batch of 11 × \d+ tokens of task examples needs about .* GiB "
                                       r"of memory, more than the 0.0 GiB this machine has free; give a smaller "
                                       r"--batch-size"):
        score(model, tokenizer, files, names=("lambada",), batch_size=10_000)
    assert score(model, tokenizer, files, names=("lambada",), batch_size=1)["lambada"].examples > 0
