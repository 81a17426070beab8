"""Task speed: `gpt eval --task hellaswag,lambada` against lm-evaluation-harness's `hf` backend, same model,
same examples, one process, identical scores (checked).

The model is a random-init GPT-2 124M saved with transformers (config.json + model.safetensors + the
GPT-2 tokenizer files), which lm-eval's HFLM loads as it is and gptcli reads through `load-hf`. The
examples are written to local files in the Hub datasets' layouts: the real sets need the network, so
they are made from a corpus's words with HellaSwag-like lengths (a label, a 15-60 word context, four
8-30 word endings) and LAMBADA-like passages (40-110 words). lm-eval runs its own task definitions
(installed YAML and preprocessing) pointed at those files.

Each way is timed from examples on disk to metrics with standard errors, model load excluded (each
loads once, before): for lm-eval `evaluator.evaluate` (reading, tokenizing, scoring, its aggregation and
its default 100,000-draw perplexity bootstrap), for gptcli `read_all` + `evaluate_tasks` (the same
steps). The ways run in turns, best of --repeats, one torch thread by default.

    python bench/tasks.py [--tasks hellaswag lambada] [--examples 40] [--repeats 2] [--batch-size 8]
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


def synthetic_records(words: list[str], count: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    draw = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(draw.choice(words) for _ in range(draw.randint(low, high))) + "."

    hellaswag = [{"activity_label": " ".join(draw.choice(words).capitalize() for _ in range(2)),
                  "ctx_a": sentence(15, 60), "ctx_b": draw.choice(words),
                  "endings": [sentence(8, 30) for _ in range(4)], "label": str(draw.randrange(4))}
                 for _ in range(count)]
    lambada = [{"text": sentence(40, 110)[:-1]} for _ in range(count)]
    return hellaswag, lambada


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


def lm_eval_tasks(files: dict[str, Path], cache: Path) -> dict:
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks = {}
    for name, yaml_file in (("hellaswag", "hellaswag/hellaswag.yaml"), ("lambada", "lambada/lambada_openai.yaml")):
        if name not in files:
            continue
        config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
        split = config.get("validation_split") or config["test_split"]
        config.update(task=name, dataset_path="json", dataset_name=None, training_split=None,
                      dataset_kwargs={"data_files": {split: str(files[name])}, "cache_dir": str(cache)})
        tasks[name] = ConfigurableTask(config=config)
    return tasks


def compare(lm_eval_result: dict, ours: dict, examples: dict) -> dict:
    """Per-example accuracies equal and log-likelihoods within 1e-4, for every task; the metrics equal."""
    from gptcli.tasks.benchmarks import benchmark

    worst, same = 0.0, True
    for name, result in ours.items():
        samples = sorted(lm_eval_result["samples"][name], key=lambda s: s["doc_id"])
        for sample, example, scored in zip(samples, examples[name], result.scores, strict=True):
            for (ll, greedy), s in zip(sample["filtered_resps"], scored, strict=True):
                worst = max(worst, abs(ll - s.loglikelihood))
                same &= greedy == s.greedy
            outcome = benchmark(name).outcomes(example, scored)
            same &= all(sample[k] == outcome[k] for k in ("acc", "acc_norm") if k in sample)
        for metric, (value, _) in result.metrics.items():
            reference = lm_eval_result["results"][name][f"{metric},none"]
            same &= value == reference if metric != "perplexity" else abs(value / reference - 1) < 1e-5
    return {"identical_accuracies": same, "max_loglikelihood_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40, help="examples of each task")
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "lambada"], choices=["hellaswag", "lambada"])
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
        hellaswag, lambada = synthetic_records(words, args.examples)
        records = {"hellaswag": hellaswag, "lambada": lambada}
        files = {name: write_jsonl(directory / f"{name}.jsonl", records[name]) for name in args.tasks}
        loaded = make_models(directory)
        lms = {size: HFLM(pretrained=str(directory / "hf"), device="cpu", batch_size=size)
               for size in args.lm_eval_batch_sizes}

        def run_gptcli():
            tasks = read_all(list(files), {k: str(v) for k, v in files.items()}, 0)
            return {r.name: r for r in evaluate_tasks(loaded.model, loaded.tokenizer, tasks,
                                                      batch_size=args.batch_size)}

        ways = {"gptcli": run_gptcli}
        for size, lm in lms.items():
            ways[f"lm-eval hf, batch size {size}"] = (lambda lm=lm: evaluator.evaluate(
                lm, lm_eval_tasks(files, directory / "cache"), log_samples=True, verbosity="ERROR"))
        best, results = {}, {}
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                results[name] = way()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        ours = results["gptcli"]
        report = {"tasks": args.tasks, "threads": torch.get_num_threads(), "examples_per_task": args.examples,
                  "gptcli_batch_size": args.batch_size, "seconds": {k: round(v, 2) for k, v in best.items()},
                  "speedup": {k: round(v / best["gptcli"], 2) for k, v in best.items() if k != "gptcli"},
                  "scores": {name: {m: round(v, 6) for m, (v, _) in r.metrics.items()} for name, r in ours.items()}}
        examples = {bench.name: read for bench, read, _ in read_all(list(files), {k: str(v) for k, v in files.items()}, 0)}
        for name in ways:
            if name != "gptcli":
                report[f"same as {name}"] = compare(results[name], ours, examples)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
