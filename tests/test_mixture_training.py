"""`gpt train` on a mixture of two prepared dirs (`[[data.sources]]`), on the CPU through DeepSpeed: a kill -9 and
a resume give the same losses bit for bit, a resume with other weights is refused before DeepSpeed starts and
continued on purpose with data.allow_mixture_change, and every step records what each source gave and each
source's val loss. One-rank runs of the nano preset; the schedule itself, on 1 and 2 ranks, is test_mixture.py's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import assert_user_error, project_file, records, run_gpt, train, trained
from shard_fixture import make_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus, shards):
    """Two prepared dirs of unequal size: "code" the session's shards (the whole corpus), "more" a smaller dir of
    the corpus's last 500,000 characters."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "more.txt").write_text(corpus.read_text()[700_000:])
    return {"code": shards, "more": make_shards(root / "more.txt", root / "more", shard_tokens=40_000, val_tokens=6_000)}


def mixture_project(directory: Path, sources: dict, weights: dict, *overrides: str, name: str = "run") -> Path:
    """The conftest nano run (project_file) reading `sources` in `weights` instead of its one dir, in micro
    batches of 4 windows of 64 tokens: 8 windows a step, which the weights 0.75/0.25 share out 6 to 2."""
    tables = ", ".join(f'{{ name = "{n}", dir = "{sources[n]}", weight = {w} }}' for n, w in weights.items())
    return project_file(directory, sources["code"], f"data.sources=[{tables}]", "train.micro_batch_size=4",
                        "train.seq_len=64", *overrides, name=name)


WEIGHTS = {"code": 0.75, "more": 0.25}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sources):
    directory = tmp_path_factory.mktemp("reference")
    result = train(mixture_project(directory, sources, WEIGHTS))
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "run", result.stderr


def test_a_mixture_run_records_each_sources_tokens_and_val_loss(reference):
    run_dir, stderr = reference
    steps = records(run_dir)
    assert len(steps) == 8
    for record in steps:  # 8 windows of 64 tokens a step: 6 from code, 2 from more, at every step
        assert record["tokens/code"] + record["tokens/more"] == record["tokens"] == record["step"] * 512
        assert record["tokens/code"] == 3 * record["tokens/more"]
    evaluated = [r for r in steps if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [4, 8]
    for record in evaluated:
        code, more = record["eval_tokens/code"], record["eval_tokens/more"]
        assert code == more == 2 * 4 * 64  # eval_batches × micro batch × seq_len, each source
        weighted = (record["eval_loss/code"] * code + record["eval_loss/more"] * more) / (code + more)
        assert record["eval_loss"] == pytest.approx(weighted, rel=1e-12)
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"tokens/code", "eval_loss/more", "eval_tokens/code"} <= set(header)
    segments = json.loads((run_dir / "mixture.json").read_text())["segments"]
    assert [(s["step"], [(e["name"], e["share"], e["period"]) for e in s["sources"]]) for s in segments] == [
        (0, [("code", 3, 4), ("more", 1, 4)])]
    table = stderr[stderr.index("data: a mixture of 2 sources"):].splitlines()
    assert table[2].split()[0] == "code" and table[2].split()[2:4] == ["0.750", "3,072"]  # 48 windows × 64


def test_kill_9_and_resume_reproduce_a_mixture_run_and_a_changed_mixture_is_refused(tmp_path, sources, reference):
    run_dir, _ = reference
    project = mixture_project(tmp_path, sources, WEIGHTS)
    killed = train(project, fault="kill@5")
    assert killed.returncode in (-9, 137)
    changed = mixture_project(tmp_path, sources, {"code": 0.5, "more": 0.5}, name="run")
    refused = train(changed, "--resume", "required")
    assert_user_error(refused, "The checkpoint at step 3 was trained on another mixture (weights code 0.750 → 0.500, "
                               "more 0.250 → 0.500)", "data.allow_mixture_change = true", "--restart")
    assert "loading DeepSpeed" not in refused.stderr  # refused by pre-flight, before anything slow
    project = mixture_project(tmp_path, sources, WEIGHTS)
    resumed = train(project, "--resume", "required")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(r["loss"], r.get("eval_loss/more")) for r in records(tmp_path / "run")] == [
        (r["loss"], r.get("eval_loss/more")) for r in records(run_dir)]

    further = mixture_project(tmp_path, sources, {"code": 0.5, "more": 0.5}, "data.allow_mixture_change=true",
                           "train.max_steps=10")
    continued = train(further)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "the mixture changed at step 8 (weights code 0.750 → 0.500, more 0.250 → 0.500)" in continued.stderr
    steps = records(tmp_path / "run")
    assert [(r["tokens/code"], r["tokens/more"]) for r in steps[7:]] == [(48 * 64, 16 * 64), (52 * 64, 20 * 64),
                                                                         (56 * 64, 24 * 64)]
    segments = json.loads((tmp_path / "run" / "mixture.json").read_text())["segments"]
    assert [segment["step"] for segment in segments] == [0, 8]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "books-wiki.toml"
# The example as it is, but the nano model and a few CPU steps: the [[data.sources]] are the file's own.
ON_A_CPU = ("model.preset=nano", "model.vocab_multiple=1", "train.device=cpu", 'train.precision="fp32"',
            "train.compile=false", "train.micro_batch_size=4", "train.seq_len=64", "train.global_batch_tokens=0",
            "train.grad_accum_steps=1", "train.max_steps=6", "train.warmup_steps=2", "train.eval_every=3",
            "train.eval_batches=2", "train.checkpoint_every=3", "train.sample_every=0", "deepspeed.zero_stage=1")


def test_the_books_wiki_example_runs_end_to_end_on_small_local_copies(tmp_path, corpus):
    """books: a text file (a BookCorpus copy is two such files); wiki: a dataset saved with save_to_disk (what
    `gpt prepare hf:wikimedia/wikipedia/...` streams from the Hub, here offline). Both prepared into the dirs
    the example names, relative to the working directory; then the example trains on them."""
    import datasets

    text = corpus.read_text()
    (tmp_path / "books.txt").write_text(text[:500_000])
    articles = [chunk for chunk in text[500_000:1_100_000].split("\n\n\n") if chunk.strip()]
    datasets.Dataset.from_dict({"title": [a[:20] for a in articles], "text": articles}).save_to_disk(tmp_path / "wiki")
    for name, source in (("books", "books.txt"), ("wiki", "wiki")):
        prepared = run_gpt("prepare", source, "--out", f"data/{name}", "--val-fraction", "0.05", cwd=tmp_path)
        assert prepared.returncode == 0, prepared.stderr[-2000:]
    run_dir = trained(EXAMPLE, *[f"--set={o}" for o in ON_A_CPU], cwd=tmp_path)
    steps = records(tmp_path / run_dir)
    assert len(steps) == 6 and steps[-1]["tokens/books"] + steps[-1]["tokens/wiki"] == 6 * 4 * 64
    assert abs(steps[-1]["tokens/books"] / steps[-1]["tokens"] - 0.7) <= 64 / steps[-1]["tokens"]  # within a window
    assert {"eval_loss/books", "eval_loss/wiki"} <= set(steps[2]) and steps[-1]["eval_loss"] < steps[0]["loss"]
    evaluated = run_gpt("eval", "--project", EXAMPLE, *[f"--set={o}" for o in ON_A_CPU], "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout)
    assert set(result["sources"]) == {"books", "wiki"}
    parts = result["sources"].values()
    assert result["loss"] == pytest.approx(sum(p["loss"] * p["tokens"] for p in parts) / result["tokens"], rel=1e-9)
