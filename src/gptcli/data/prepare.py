"""`gpt prepare`: any corpus → token shards, in parallel, in constant memory, never half-written.

    inputs ──reader (sources.py, main process)──▶ tasks of ~4 MB text
           ──worker pool (processes)──▶ tokens + per-document counts, in task order
           ──writer (main process)──▶ seeded train/val split by document ─▶ shards ─▶ manifest.json last

Documents end with one end-of-text token (50256 for GPT-2): it follows every document, so a training
window that sees it knows a new, unrelated text starts next. A tokenizer without one (openai-gpt)
concatenates documents with no marker.

Everything is written into a hidden staging dir beside the output dir and renamed into place only once
the manifest is in it, so an interrupted run never leaves a directory that loads as complete, and
`--force` never mixes old shards with new ones.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import GptError
from ..fsutil import publish_dir
from ..tokenizer import Tokenizer, load_tokenizer
from .shards import FORMAT_VERSION, MANIFEST, ShardRecord, ShardWriter, open_prepared, token_dtype, write_manifest
from .sources import ReadState, Source, resolve_inputs, source_tasks

CHUNK_CHARS = 1 << 20  # text per task: big enough to amortize inter-process transfer, small enough for flat memory
TASKS_PER_WORKER = 2  # tasks in flight per worker: keeps every worker busy while memory stays bounded

ProgressFn = Callable[["Progress"], None]


@dataclass
class PrepareOptions:
    """What to prepare and how; the CLI fills it from [data], [project] seed and its options."""

    inputs: list[str]
    out: Path
    tokenizer: str = "gpt2"
    vocab_dir: Optional[str] = None
    separator: str = "none"
    text_column: str = "text"
    val_fraction: float = 0.005
    seed: int = 1337
    shard_tokens: int = 100_000_000
    workers: int = 0
    force: bool = False
    replace_invalid_utf8: bool = False
    chunk_chars: int = CHUNK_CHARS


@dataclass
class Progress:
    """Handed to the progress callback after each task; `total_bytes` is 0 when unknown."""

    disk_bytes: int
    total_bytes: int
    documents: int
    tokens: int


@dataclass
class PrepareSummary:
    out: Path
    documents: dict[str, int]
    tokens: dict[str, int]
    shards: dict[str, int]
    bytes: int
    replaced_bytes: int
    seconds: float
    workers: int
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_byte(self) -> float:
        return sum(self.tokens.values()) / self.bytes if self.bytes else 0.0

    def to_json(self) -> dict:
        return {"out": str(self.out), "documents": sum(self.documents.values()),
                "documents_by_split": self.documents, "tokens": self.tokens, "shards": self.shards,
                "bytes": self.bytes, "tokens_per_byte": round(self.tokens_per_byte, 6),
                "replaced_bytes": self.replaced_bytes, "seconds": round(self.seconds, 3), "workers": self.workers}


# --- the worker: task → tokens -----------------------------------------------------------------------------

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(name: str, vocab_dir: Optional[str]) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle and clean up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must end a worker at once
    _worker_tokenizer = load_tokenizer(name, vocab_dir)  # a cache hit when the pool forks


def tokenize_task(task: tuple, tokenizer: Optional[Tokenizer] = None) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """One task → (token ids with an end-of-text after each finished document, tokens per document,
    whether the last document continues in the next task, UTF-8 bytes of dataset rows)."""
    tokenizer = tokenizer or _worker_tokenizer
    documents, closes, row_bytes = task_documents(task)
    # A plain loop of encode_ordinary beats tiktoken's encode_ordinary_batch here: the batch call spins
    # up a thread pool per call and, with one thread per worker process, measured 3-10x slower.
    encoded = tokenizer.encode_each(documents)
    counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=token_dtype(tokenizer.vocab_size),
                      count=int(counts.sum()))
    if tokenizer.eot_id is not None and len(counts):
        ends = np.cumsum(counts) if closes else np.cumsum(counts[:-1])  # an open document has no end yet
        ids = np.insert(ids, ends, tokenizer.eot_id)
        counts[: len(ends)] += 1
    return ids, counts, not closes, row_bytes


def task_documents(task: tuple) -> tuple[list[str], bool, int]:
    """(documents, whether the last one ends in this task, UTF-8 bytes of dataset rows)."""
    kind = task[0]
    if kind == "piece":
        return [task[1]], task[2], 0
    if kind == "lines":
        return [line.rstrip("\r") for line in task[1].split("\n") if line.strip()], True, 0
    if kind == "paragraphs":
        return _paragraphs(task[1]), True, 0
    if kind == "jsonl":
        return _jsonl_records(*task[1:]), True, 0
    texts = [text for text in task[1] if text]
    return texts, True, sum(len(text.encode("utf-8")) for text in texts)


def _paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines, joined by "\\n" (line ends normalized, blank lines dropped)."""
    paragraphs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line.rstrip("\r"))
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _jsonl_records(text: str, path: str, first_line: int, column: str) -> list[str]:
    records = []
    for offset, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        number = first_line + offset
        try:
            record = json.loads(line)
        except ValueError:
            raise GptError(f"{path} line {number} is not valid JSON.") from None
        if not isinstance(record, dict) or column not in record:
            raise GptError(f"{path} line {number} has no {column!r} field (name the text field with --text-column).")
        value = record[column]
        if not isinstance(value, str):
            raise GptError(f"{path} line {number}: field {column!r} holds {type(value).__name__}, not text.")
        if value:
            records.append(value)
    return records


# --- the split: seeded, by document ------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def validation_mask(document_ids: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """True where a document goes to val: splitmix64(seed, index) as a uniform number < val_fraction.
    Depends only on the seed and the document's index in the corpus, never on workers or chunking."""
    if val_fraction <= 0:
        return np.zeros(len(document_ids), dtype=bool)
    z = document_ids.astype(np.uint64) + np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    # splitmix64's finalizer (Steele, Lea & Flood 2014); uint64 arithmetic wraps modulo 2**64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


# --- the writer: tokens → shards ----------------------------------------------------------------------------


class SplitWriter:
    """The shards of one split: `{split}_000000.bin`, ... of exactly `shard_tokens` tokens but the last."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, tokenizer: Tokenizer):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.tokenizer = tokenizer
        self.records: list[ShardRecord] = []
        self.writer: Optional[ShardWriter] = None
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        while len(tokens):
            if self.writer is None:
                path = self.directory / f"{self.split}_{len(self.records):06d}.bin"
                self.writer = ShardWriter(path, self.tokenizer.vocab_size, self.tokenizer.fingerprint)
            room = self.shard_tokens - self.writer.num_tokens
            self.writer.write(tokens[:room])
            tokens = tokens[room:]
            if self.writer.num_tokens == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        record = self.writer.close()
        record.split = self.split
        self.records.append(record)
        self.writer = None

    def finish(self) -> list[ShardRecord]:
        if self.writer is not None:
            self._close_shard()
        return self.records

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class Assembler:
    """Numbers documents in corpus order, splits them and sends their tokens to the split writers."""

    def __init__(self, writers: dict[str, SplitWriter], seed: int, val_fraction: float):
        self.writers, self.seed, self.val_fraction = writers, seed, val_fraction
        self.next_document = 0  # documents begun so far
        self.open = False  # the last document continues in the next task
        self.documents = {"train": 0, "val": 0}
        self.row_bytes = 0

    def add(self, result: tuple[np.ndarray, np.ndarray, bool, int]) -> None:
        tokens, counts, last_open, row_bytes = result
        self.row_bytes += row_bytes
        if len(counts) == 0:
            return
        first = self.next_document - 1 if self.open else self.next_document
        document_ids = first + np.arange(len(counts), dtype=np.int64)
        to_val = validation_mask(document_ids, self.seed, self.val_fraction)
        started = document_ids >= self.next_document  # the first entry may continue an open document
        self.documents["val"] += int(np.count_nonzero(to_val & started))
        self.documents["train"] += int(np.count_nonzero(~to_val & started))
        self.next_document = first + len(counts)
        self.open = last_open
        token_to_val = np.repeat(to_val, counts)
        self.writers["train"].write(tokens[~token_to_val])
        self.writers["val"].write(tokens[token_to_val])


# --- the run ---------------------------------------------------------------------------------------------------


def worker_count(requested: int) -> int:
    """0 means one per core this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def prepare(options: PrepareOptions, on_progress: Optional[ProgressFn] = None) -> PrepareSummary:
    """Tokenize `options.inputs` into shards under `options.out`; see the module docstring."""
    started = time.perf_counter()
    out = Path(options.out)
    check_output_dir(out, options.force)
    sources = resolve_inputs(options.inputs)
    tokenizer = load_tokenizer(options.tokenizer, options.vocab_dir)
    workers = worker_count(options.workers)
    staging = make_staging_dir(out)
    try:
        with _sigterm_as_interrupt():
            summary, manifest = _prepare_into(staging, sources, tokenizer, options, workers, on_progress, started)
            write_manifest(staging, manifest)
            publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary.out = out
    return summary


def _prepare_into(staging: Path, sources: list[Source], tokenizer: Tokenizer, options: PrepareOptions,
                  workers: int, on_progress: Optional[ProgressFn], started: float):
    writers = {split: SplitWriter(staging, split, options.shard_tokens, tokenizer) for split in ("train", "val")}
    assembler = Assembler(writers, options.seed, options.val_fraction)
    state = ReadState()
    total_bytes = sum(s.size for s in sources) if all(s.size for s in sources) else 0
    tasks = (task for source in sources for task in source_tasks(
        source, options.separator, options.text_column, options.chunk_chars, options.replace_invalid_utf8, state))
    try:
        for result in _tokenized(tasks, tokenizer, options, workers):
            assembler.add(result)
            if on_progress:
                on_progress(Progress(state.disk_bytes, total_bytes, sum(assembler.documents.values()),
                                     writers["train"].tokens + writers["val"].tokens))
        records = writers["train"].finish() + writers["val"].finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    text_bytes = state.text_bytes + assembler.row_bytes
    if sum(assembler.documents.values()) == 0:
        raise GptError(f"The input ({', '.join(s.label for s in sources[:3])}{', ...' if len(sources) > 3 else ''}) "
                       "holds no text: nothing to prepare.")
    summary = PrepareSummary(out=staging, documents=dict(assembler.documents),
                             tokens={s: w.tokens for s, w in writers.items()},
                             shards={s: len(w.records) for s, w in writers.items()}, bytes=text_bytes,
                             replaced_bytes=state.replaced, seconds=time.perf_counter() - started, workers=workers)
    summary.warnings = _warnings(summary, options)
    return summary, build_manifest(summary, sources, records, tokenizer, options)


def _tokenized(tasks, tokenizer: Tokenizer, options: PrepareOptions, workers: int):
    """Results in task order. One worker tokenizes in this process; more use worker processes with a
    bounded number of tasks in flight (Pool.imap would read the whole corpus ahead). Processes, not
    threads: tiktoken's per-call work is short and the Python around it holds the GIL, so two threads
    measured 0.9x one thread here. ProcessPoolExecutor rather than Pool: a worker that dies (OOM killer)
    breaks the run with an error instead of leaving it waiting forever for the lost task."""
    if workers == 1:
        for task in tasks:
            yield tokenize_task(task, tokenizer)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    executor = ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_init_worker,
                                   initargs=(options.tokenizer, options.vocab_dir))
    executor.submit(int).result()  # start every worker now, before reading starts any thread (see below)
    pending = collections.deque()
    try:
        for task in tasks:
            pending.append(executor.submit(tokenize_task, task))
            if len(pending) >= workers * TASKS_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise GptError("A tokenizer worker process died (out of memory?); try fewer --workers.") from None
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_context():
    """Fork where there is fork: workers share the loaded vocabulary and start in milliseconds. It is
    safe because every worker is forked at once, before this process runs any other thread (the
    progress bar starts on the first result; pyarrow's threads come with the first dataset read), and
    ProcessPoolExecutor never forks a replacement mid-run. Spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _warnings(summary: PrepareSummary, options: PrepareOptions) -> list[str]:
    warnings = []
    if summary.replaced_bytes:
        warnings.append(f"{summary.replaced_bytes:,} invalid UTF-8 bytes were read as U+FFFD.")
    if options.val_fraction > 0 and summary.tokens["val"] == 0:
        warnings.append(f"No document was drawn for val (val_fraction {options.val_fraction} of "
                        f"{sum(summary.documents.values()):,} documents).")
    if summary.tokens["train"] == 0:
        warnings.append("No document was drawn for train.")
    return warnings


def build_manifest(summary: PrepareSummary, sources: list[Source], records: list[ShardRecord],
                   tokenizer: Tokenizer, options: PrepareOptions) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                      "eot_position": "end" if tokenizer.eot_id is not None else None},
        "inputs": [{"kind": s.kind, "location": s.label} for s in sources],
        "separator": options.separator,
        "text_column": options.text_column,
        "split": {"val_fraction": options.val_fraction, "seed": options.seed, "by": "document"},
        "documents": sum(summary.documents.values()),
        "documents_by_split": summary.documents,
        "tokens": summary.tokens,
        "bytes": summary.bytes,
        "replaced_bytes": summary.replaced_bytes,
        "shard_tokens": options.shard_tokens,
        "seconds": round(summary.seconds, 3),
        "shards": [{"file": r.file, "split": r.split, "tokens": r.tokens, "sha256": r.sha256} for r in records],
    }


# --- the output directory --------------------------------------------------------------------------------------


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse before any work: a file in the way, a non-empty dir without --force, or (even with --force)
    a non-empty dir that does not look like prepared data."""
    if out.exists() and not out.is_dir():
        raise GptError(f"Output {out} is a file, not a directory.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise GptError(f"Output dir {out} is not empty; pass --force to replace it, or choose another --out.")
    names = [p.name for p in out.iterdir()]
    if MANIFEST not in names and not all(n.endswith((".bin", ".tmp")) for n in names):
        raise GptError(f"Output dir {out} is not empty and holds no {MANIFEST}: it does not look like prepared "
                       "data, so it is not replaced even with --force.")


def make_staging_dir(out: Path) -> Path:
    """A hidden sibling of `out` (same file system, so the final rename is atomic); stale ones left by a
    killed run (their process is gone) are removed first."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        staging = parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        raise GptError(f"Cannot write the output dir {out}: {error.strerror or error}.") from None
    return staging


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _sigterm_as_interrupt:
    """`kill PID` cleans up like Ctrl-C does (only in the main thread, where signals can be set)."""

    def __enter__(self):
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# --- verification ------------------------------------------------------------------------------------------------


def verify_prepared(directory: Path) -> dict:
    """Check every shard of a prepared dir: magic, version, size against its header, header against the
    manifest, sha256 against the manifest, every id inside the vocabulary."""
    data = open_prepared(directory, verify=True)
    tokens = {split: data.num_tokens(split) for split in ("train", "val")}
    listed = data.manifest.get("tokens")
    if isinstance(listed, dict) and any(int(listed.get(s, 0)) != tokens[s] for s in tokens):
        raise GptError(f"The shards in {directory} hold {tokens} tokens but {MANIFEST} counts {listed}.")
    return {"ok": True, "dir": str(directory), "shards": sum(len(s) for s in data.splits.values()),
            "tokens": tokens, "documents": data.manifest.get("documents"),
            "tokenizer": data.manifest["tokenizer"]["fingerprint"]}
