"""Task speed: `gpt eval --task` against lm-evaluation-harness's `hf` backend, task by task, same model,
same examples, one process, identical scores (checked).

The model is a random-init GPT-2 124M saved with transformers (config.json + model.safetensors + the
GPT-2 tokenizer files), which lm-eval's HFLM loads as it is and gptcli reads through `load-hf`. The
examples are written to local files in the Hub datasets' layouts: the real sets need the network, so they
are made from a corpus's words with each set's shape (the lengths below, in words, after the published
descriptions of each set): HellaSwag (a 15-60 word context, four 8-30 word endings), LAMBADA (40-110 word
passages), PIQA (a 4-15 word goal, two 5-30 word solutions), ARC (a 10-35 word question, four 1-6 word
choices), WinoGrande (a 15-30 word sentence with a blank, two one-word options), OpenBookQA (a 5-15 word
stem, four 2-6 word choices), SciQ (a 40-120 word support, a 6-15 word question, four 1-3 word answers) and
BoolQ (a 60-140 word passage, a 5-10 word question). lm-eval runs its own task definitions (installed YAML
and utils) pointed at those files.

Each way is timed from examples on disk to metrics with standard errors, model load excluded (each
loads once, before): for lm-eval `evaluator.evaluate` (reading, tokenizing, scoring, its aggregation and,
for LAMBADA, its default 100,000-draw perplexity bootstrap), for gptcli `read_all` + `evaluate_tasks` (the
same steps). For each task the ways run in turns, best of --repeats, one torch thread by default.

    python bench/tasks.py [--tasks hellaswag lambada piqa ...] [--examples 40] [--repeats 2] [--batch-size 8]
                          [--lm-eval-batch-sizes 1 8]
                          [--corpus ../shared/corpora/tinyshakespeare.txt] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared"
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap in this process, as gptcli's

from gptcli.tasks import evaluate_tasks, read_all  # noqa: E402

TASKS = ("hellaswag", "lambada", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "sciq", "boolq")
# lm-eval 0.4's definition of each, under lm_eval/tasks.
LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "lambada": "lambada/lambada_openai.yaml",
                "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "winogrande": "winogrande/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "sciq": "sciq/sciq.yaml", "boolq": "super_glue/boolq/default.yaml"}


def synthetic_records(words: list[str], count: int, seed: int = 0) -> dict[str, list[dict]]:
    """`count` records of each task in its Hub layout, made of `words` with the set's lengths."""
    draw = random.Random(seed)

    def text(low: int, high: int, end: str = ".") -> str:
        return " ".join(draw.choice(words) for _ in range(draw.randint(low, high))) + end

    def lettered(low: int, high: int) -> dict:
        return {"text": [text(low, high, "") for _ in range(4)], "label": list("ABCD")}

    def winogrande() -> dict:
        before, after = text(4, 12, ""), text(8, 18)
        return {"sentence": f"{before} _ {after}", "option1": draw.choice(words), "option2": draw.choice(words),
                "answer": draw.choice("12")}

    makers = {
        "hellaswag": lambda: {"activity_label": " ".join(draw.choice(words).capitalize() for _ in range(2)),
                              "ctx_a": text(15, 60), "ctx_b": draw.choice(words),
                              "endings": [text(8, 30) for _ in range(4)], "label": str(draw.randrange(4))},
        "lambada": lambda: {"text": text(40, 110, "")},
        "piqa": lambda: {"goal": text(4, 15, "?"), "sol1": text(5, 30), "sol2": text(5, 30), "label": draw.randrange(2)},
        "arc": lambda: {"id": "x", "question": text(10, 35, "?"), "choices": lettered(1, 6),
                        "answerKey": draw.choice("ABCD")},
        "winogrande": winogrande,
        "openbookqa": lambda: {"id": "x", "question_stem": text(5, 15, ""), "choices": lettered(2, 6),
                               "answerKey": draw.choice("ABCD")},
        "sciq": lambda: {"support": text(40, 120), "question": text(6, 15, "?"),
                         **{f"distractor{i}": text(1, 3, "") for i in (1, 2, 3)}, "correct_answer": text(1, 3, "")},
        "boolq": lambda: {"passage": text(60, 140), "question": text(5, 10, ""), "idx": 0, "label": draw.randrange(2)},
    }
    records = {name: [make() for _ in range(count)] for name, make in makers.items()}
    records["arc_easy"] = records["arc_challenge"] = records.pop("arc")
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_models(directory: Path):
    """A random GPT-2 124M saved with transformers, and the same weights read by gptcli's load-hf."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcli.hf import load_hf
    from gptcli.modeldir import load_model_dir
    from gptcli.tokenizer import load_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory / "hf")
    load_tokenizer("gpt2").save_for_hf(directory / "hf", 1024)
    load_hf(str(directory / "hf"), directory / "gptcli")
    return load_model_dir(directory / "gptcli")


def lm_eval_task(name: str, data_file: Path, cache: Path):
    """lm-eval's own task reading `data_file` as the split it scores: test where it names one, else validation."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name])
    split = config.get("test_split") or config["validation_split"]
    config.update(task=name, dataset_path="json", dataset_name=None, training_split=None,
                  validation_split=split if split == config.get("validation_split") else None,
                  test_split=split if split == config.get("test_split") else None,
                  dataset_kwargs={"data_files": {split: str(data_file)}, "cache_dir": str(cache)})
    return ConfigurableTask(config=config)


def compare(lm_eval_result: dict, ours, examples) -> dict:
    """One task: per-example outcomes equal and log-likelihoods within 1e-4; the metrics equal (perplexity
    to 1e-5: lm-eval sums in another order)."""
    from gptcli.tasks.benchmarks import benchmark

    bench = benchmark(ours.name)
    worst, same = 0.0, True
    samples = sorted(lm_eval_result["samples"][ours.name], key=lambda s: s["doc_id"])
    for sample, example, scored in zip(samples, examples, ours.scores, strict=True):
        for (ll, greedy), s in zip(sample["filtered_resps"], scored, strict=True):
            worst = max(worst, abs(ll - s.loglikelihood))
            same &= greedy == s.greedy
        outcome = bench.outcomes(example, scored)
        same &= all(sample[k] == outcome[k] for k in ("acc", "acc_norm") if k in sample)
    for metric, (value, _) in ours.metrics.items():
        reference = lm_eval_result["results"][ours.name][f"{metric},none"]
        same &= value == reference if metric != "perplexity" else abs(value / reference - 1) < 1e-5
    return {"identical_accuracies": same, "max_loglikelihood_difference": worst}


def time_ways(ways: dict, repeats: int) -> tuple[dict, dict]:
    """Each way's best time over `repeats` turns, and its last result."""
    best, results = {}, {}
    for _ in range(repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            results[name] = way()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40, help="examples of each task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="gptcli's [eval] batch_size")
    parser.add_argument("--lm-eval-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpora" / "tinyshakespeare.txt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    words = [w for w in args.corpus.read_text().split() if w.isalpha()]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        records = synthetic_records(words, args.examples)
        files = {name: write_jsonl(directory / f"{name}.jsonl", records[name]) for name in args.tasks}
        loaded = make_models(directory)
        lms = {size: HFLM(pretrained=str(directory / "hf"), device="cpu", batch_size=size)
               for size in args.lm_eval_batch_sizes}
        report: dict = {"threads": torch.get_num_threads(), "examples_per_task": args.examples,
                        "gptcli_batch_size": args.batch_size, "tasks": {}}
        for name in args.tasks:
            def run_gptcli(name=name):
                tasks = read_all([name], {name: str(files[name])}, 0)
                return evaluate_tasks(loaded.model, loaded.tokenizer, tasks, batch_size=args.batch_size)[0]

            ways = {"gptcli": run_gptcli}
            for size, lm in lms.items():
                ways[f"lm-eval hf, batch size {size}"] = (lambda lm=lm, name=name: evaluator.evaluate(
                    lm, {name: lm_eval_task(name, files[name], directory / "cache")}, log_samples=True,
                    verbosity="ERROR"))
            best, results = time_ways(ways, args.repeats)
            ours = results["gptcli"]
            examples = read_all([name], {name: str(files[name])}, 0)[0][1]
            report["tasks"][name] = {
                "seconds": {k: round(v, 2) for k, v in best.items()},
                "speedup": {k: round(v / best["gptcli"], 2) for k, v in best.items() if k != "gptcli"},
                "scores": {m: round(v, 6) for m, (v, _) in ours.metrics.items()},
                **{f"same as {k}": compare(results[k], ours, examples) for k in ways if k != "gptcli"}}
            print(json.dumps({name: report["tasks"][name]}), file=sys.stderr, flush=True)
        totals = {way: round(sum(task["seconds"][way] for task in report["tasks"].values()), 2) for way in ways}
        report["total_seconds"] = totals
        report["total_speedup"] = {k: round(v / totals["gptcli"], 2) for k, v in totals.items() if k != "gptcli"}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
