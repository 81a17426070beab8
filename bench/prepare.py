"""Benchmark `gpt prepare` against the ways it replaces, on the same documents in one run.

    python bench/prepare.py [--mb 50] [--memory-mb 256 1024] [--workers 0] [--repeat 3]

1. Throughput on a corpus of `--mb` MB (tinyshakespeare repeated), one document per line (BookCorpus's
   layout) and one per paragraph:
   - gptcli: `prepare()` with all cores, shards and manifest written;
   - a single-process loop of tiktoken `encode_ordinary` over the same documents, ids written to a file;
   - the line-by-line `transformers.GPT2TokenizerFast` way (built offline from ../shared/gpt2_bpe).
2. Peak RSS of `gpt prepare` (main process + workers, summed, sampled every 50 ms) on corpora of each
   `--memory-mb` size: it must stay under 300 MB and not grow with the corpus.

Corpora are written under /tmp and deleted afterwards. Needs psutil and transformers (test extras).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

from gptcli.data.prepare import PrepareOptions, prepare  # noqa: E402

EOT = 50256


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the workers are joined by then)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_corpus(path: Path, megabytes: int) -> Path:
    text = (SHARED / "corpora" / "tinyshakespeare.txt").read_bytes()
    with open(path, "wb") as handle:
        for _ in range(max(1, round(megabytes * 2**20 / len(text)))):
            handle.write(text)
    return path


def documents(path: Path, separator: str) -> list[str]:
    text = path.read_text()
    if separator == "line":
        return [line for line in text.split("\n") if line.strip()]
    paragraphs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs + (["\n".join(current)] if current else [])


def time_gptcli(corpus: Path, separator: str, workers: int, scratch: Path) -> tuple[float, int]:
    out = scratch / f"out-{separator}"
    started = time.perf_counter()
    summary = prepare(PrepareOptions(inputs=[str(corpus)], out=out, separator=separator, workers=workers,
                                     force=True))
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return seconds, sum(summary.tokens.values())


def time_encode_ordinary_loop(corpus: Path, separator: str, scratch: Path) -> tuple[float, int]:
    """The honest single-process way: read, split, encode_ordinary each document + EOT, write uint16."""
    import tiktoken

    encoding = tiktoken.get_encoding("gpt2")
    started = time.perf_counter()
    ids: list[int] = []
    for document in documents(corpus, separator):
        ids.extend(encoding.encode_ordinary(document))
        ids.append(EOT)
    np.array(ids, dtype=np.uint16).tofile(scratch / "loop.bin")
    seconds = time.perf_counter() - started
    return seconds, len(ids)


def time_hf_line_by_line(corpus: Path, scratch: Path) -> tuple[float, int]:
    """The way gptcli replaces: a transformers tokenizer called once per line, ids saved with torch."""
    import torch
    from transformers import GPT2TokenizerFast

    vocab = scratch / "hf_vocab"  # Hugging Face's names for OpenAI's two files
    vocab.mkdir(exist_ok=True)
    shutil.copyfile(SHARED / "gpt2_bpe" / "encoder.json", vocab / "vocab.json")
    shutil.copyfile(SHARED / "gpt2_bpe" / "vocab.bpe", vocab / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(vocab))
    assert tokenizer("Hello, I'm a language model,")["input_ids"] == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    started = time.perf_counter()
    ids: list[int] = []
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                ids.extend(tokenizer(line.rstrip("\n"))["input_ids"])
                ids.append(EOT)
    torch.save(torch.tensor(ids, dtype=torch.int32), scratch / "hf.pt")
    seconds = time.perf_counter() - started
    return seconds, len(ids)


def peak_rss(command: list[str], interval: float = 0.1) -> tuple[float, dict[str, int]]:
    """(seconds, peaks) for `command`: "main" RSS of the main process, "rss" RSS summed over the process
    tree (counts shared pages once per process, so it overstates), "pss" proportional set size summed
    (shared pages split between their users: what the tree really holds)."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main = psutil.Process(process.pid)
    peaks = {"main": 0, "rss": 0, "pss": 0}

    def sample():
        while process.poll() is None:
            try:
                members = [main] + main.children(recursive=True)
                infos = [p.memory_full_info() for p in members]
            except psutil.Error:
                continue
            peaks["main"] = max(peaks["main"], infos[0].rss)
            peaks["rss"] = max(peaks["rss"], sum(i.rss for i in infos))
            peaks["pss"] = max(peaks["pss"], sum(i.pss for i in infos))
            time.sleep(interval)

    started = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"gpt prepare failed: {stderr.decode()[-500:]}")
    return time.perf_counter() - started, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="corpus size for the throughput comparison")
    parser.add_argument("--memory-mb", type=int, nargs="+", default=[256, 1024], help="corpus sizes for peak RSS")
    parser.add_argument("--workers", type=int, default=0, help="gptcli workers (0: all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per way; the best counts")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gptcli-bench-"))
    try:
        print(f"cores: {len(os.sched_getaffinity(0))}  python {sys.version.split()[0]}")
        throughput(args, scratch)
        memory(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def throughput(args, scratch: Path) -> None:
    """Each way `--repeat` times, interleaved, keeping each way's best time: on a machine shared with other
    jobs the best run is the one least disturbed by them."""
    corpus = make_corpus(scratch / "corpus.txt", args.mb)
    size = corpus.stat().st_size
    print(f"\n## throughput, {size / 2**20:.0f} MB corpus, best of {args.repeat}")
    print("| documents | way | seconds | CPU seconds | MB/s | tokens | gptcli speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for separator in ("line", "blank-line"):
        ways = {"gptcli prepare": lambda: time_gptcli(corpus, separator, args.workers, scratch),
                "encode_ordinary loop, 1 process": lambda: time_encode_ordinary_loop(corpus, separator, scratch)}
        if separator == "line" and not args.skip_hf:  # one run: it is ten times slower than the rest
            ways["GPT2TokenizerFast line by line"] = lambda: time_hf_line_by_line(corpus, scratch)
        best = {name: (float("inf"), 0, 0.0) for name in ways}
        for run in range(args.repeat):
            for name, way in ways.items():
                if run and name.startswith("GPT2"):
                    continue
                cpu_before = cpu_seconds()
                seconds, tokens = way()
                cpu = cpu_seconds() - cpu_before
                if seconds < best[name][0]:
                    best[name] = (seconds, tokens, cpu)
        ours, tokens, _ = best["gptcli prepare"]
        for name, (seconds, count, cpu) in best.items():
            assert count == tokens, (name, count, tokens)  # every way produced the same token stream length
            print(f"| {separator} | {name} | {seconds:.2f} | {cpu:.2f} | {size / 2**20 / seconds:.1f} | {count:,} | "
                  f"{seconds / ours:.2f}x |")
    corpus.unlink()


def memory(args, scratch: Path) -> None:
    print("\n## peak memory of `gpt prepare` (main process + workers)")
    print("| corpus | seconds | MB/s | main process RSS | all processes, RSS summed | all processes, PSS summed |")
    print("|---:|---:|---:|---:|---:|---:|")
    command = [sys.executable, "-m", "gptcli", "prepare"]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    for megabytes in args.memory_mb:
        corpus = make_corpus(scratch / f"memory-{megabytes}.txt", megabytes)
        out = scratch / f"memory-out-{megabytes}"
        seconds, peaks = peak_rss(command + [str(corpus), "--out", str(out), "--separator", "line",
                                             "--workers", str(args.workers)])
        size = corpus.stat().st_size
        print(f"| {size / 2**30:.2f} GiB | {seconds:.1f} | {size / 2**20 / seconds:.1f} | "
              f"{peaks['main'] / 2**20:.0f} MiB | {peaks['rss'] / 2**20:.0f} MiB | {peaks['pss'] / 2**20:.0f} MiB |")
        corpus.unlink()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
