"""`gpt prepare`: any corpus → token shards, in parallel, in constant memory, never half-written.

    inputs ──reader (sources.py, main process)──▶ tasks of ~1 MB text (or byte ranges a worker reads)
           ──worker pool (processes)──▶ tokens + per-document counts, in task order
           ──writer (main process)──▶ seeded train/val split (split.py) ─▶ shards ─▶ manifest.json last

Documents end with one end-of-text token (50256 for GPT-2): it follows every document, so a training
window that sees it knows a new, unrelated text starts next. A tokenizer without one (openai-gpt)
concatenates documents with no marker.

Everything is written into a hidden staging dir beside the output dir and renamed into place only once
the manifest is in it, so an interrupted run never leaves a directory that loads as complete, and
`--force` never mixes old shards with new ones.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config import DataConfig, Project, ProjectConfig
from ..errors import GptError, Stopped
from ..fsutil import check_replaceable, output_lock, publish_dir, read_owned, staging_dir
from ..tokenizer import ENDOFTEXT, Tokenizer, load_tokenizer
from .shards import FORMAT_VERSION, MANIFEST, ShardRecord, ShardWriter, open_prepared, token_dtype, write_manifest
from .sources import FileRange, ReadSettings, ReadState, Source, Task, read_tasks, resolve_inputs
from .split import Splitter

CHUNK_CHARS = 1 << 20  # text per task: big enough to amortize inter-process transfer, small enough for flat memory
TASKS_PER_WORKER = 2  # tasks in flight per worker: keeps every worker busy while memory stays bounded

ProgressFn = Callable[["Progress"], None]
PREPARED_DATA = "prepared data"  # what fsutil's OWNED_FILES record says a prepared dir is


@dataclass
class PrepareOptions:
    """One run of `gpt prepare`: the [data] section (the one schema for every tokenization setting), the
    split seed ([project] seed) and what belongs to this run only."""

    inputs: list[str]
    out: Path
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = field(default_factory=lambda: ProjectConfig().seed)
    force: bool = False
    replace_invalid_utf8: bool = False
    chunk_chars: int = CHUNK_CHARS

    @classmethod
    def from_project(cls, project: Project, inputs: list[str], out: Optional[Path] = None, **run) -> "PrepareOptions":
        """Options from a loaded project (its overrides already applied); `out` defaults to [data] dir."""
        return cls(inputs=list(inputs), out=Path(out or project.data.dir), data=project.data,
                   seed=project.project.seed, **run)

    @property
    def read_settings(self) -> ReadSettings:
        return ReadSettings(self.data.separator, self.data.text_column, self.chunk_chars, self.replace_invalid_utf8)


@dataclass
class Progress:
    """Handed to the progress callback after each task."""

    done_bytes: int  # input bytes on disk behind the tasks tokenized so far (compressed bytes for .gz)
    total_bytes: int  # input bytes on disk in all; 0 when unknown (datasets, hf: streams)
    documents: int
    tokens: int
    seconds: float  # since reading began (start-up excluded, so the rate is the steady one)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> Optional[float]:
        """Seconds left at the average rate so far; None when the size is unknown or nothing is done yet."""
        if not self.total_bytes or not self.done_bytes or self.seconds <= 0:
            return None
        return self.seconds * max(self.total_bytes - self.done_bytes, 0) / self.done_bytes


@dataclass
class InputCount:
    """What one input contributed."""

    input: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0


@dataclass
class PrepareSummary:
    out: Path
    documents: dict[str, int]
    tokens: dict[str, int]
    shards: dict[str, int]
    bytes: int  # UTF-8 bytes of the documents' text, whatever the input kind
    replaced_bytes: int
    seconds: float
    workers: int
    split: dict  # how val was drawn: rule, block size, val blocks
    inputs: list[InputCount] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_byte(self) -> float:
        return sum(self.tokens.values()) / self.bytes if self.bytes else 0.0

    def to_json(self) -> dict:
        return {"out": str(self.out), "documents": sum(self.documents.values()),
                "documents_by_split": self.documents, "tokens": self.tokens, "shards": self.shards,
                "bytes": self.bytes, "tokens_per_byte": round(self.tokens_per_byte, 6),
                "replaced_bytes": self.replaced_bytes, "seconds": round(self.seconds, 3), "workers": self.workers,
                "split": self.split, "inputs": [vars(count) for count in self.inputs]}


# --- the worker: task → tokens -----------------------------------------------------------------------------


@dataclass
class Tokenized:
    """A task's tokens, with an end-of-text after each document that ends in it."""

    source: int  # index of the input
    tokens: np.ndarray
    counts: np.ndarray  # tokens per document (end-of-text included); the first may continue an open document
    last_open: bool  # the last document continues in the next task
    text_bytes: int  # UTF-8 bytes of the documents' text
    replaced: int = 0  # invalid UTF-8 bytes the worker read as U+FFFD (tasks it read from disk itself)


_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(name: str, vocab_dir: Optional[str], parent: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle and clean up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ending the pool must end a worker at once
    _worker_tokenizer = load_tokenizer(name, vocab_dir)  # a cache hit when the pool forks


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a main process killed with SIGKILL (it would wait on its pipe forever,
    holding the caller's stdout open). Linux delivers SIGKILL to it when the parent dies; the getppid check
    covers a parent that died before the request took effect."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def tokenize_task(task: Task, tokenizer: Optional[Tokenizer] = None) -> Tokenized:
    tokenizer = tokenizer or _worker_tokenizer
    assert tokenizer is not None, "a worker's tokenizer is set by its initializer"
    replaced = 0
    if isinstance(task, FileRange):
        (documents, replaced), closes = task.read(), True
    else:
        documents, closes = task.documents()
    ids, counts = encode_documents(tokenizer, documents, closes)
    text_bytes = len("".join(documents).encode("utf-8", "surrogatepass"))
    return Tokenized(task.source, ids, counts, not closes and bool(documents), text_bytes, replaced)


def encode_documents(tokenizer: Tokenizer, documents: list[str], closes: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with an end-of-text after each document but an open last one, tokens per document)."""
    dtype = token_dtype(tokenizer.vocab_size)
    if not documents:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    eot = tokenizer.eot_id
    if eot is not None and type(tokenizer.backend).__module__.startswith("tiktoken"):
        # One call for the whole task: tiktoken encodes the text between allowed special tokens piece by
        # piece, exactly as encode_ordinary encodes each document, and saves a per-document call that costs
        # ~15% on short records. Only when no document holds the end-of-text string as plain text (then
        # the string occurs exactly once per boundary: it begins with "<", found nowhere else in it).
        joined = ENDOFTEXT.join(documents) + (ENDOFTEXT if closes else "")
        if joined.count(ENDOFTEXT) == len(documents) - (not closes):
            backend = tokenizer.backend
            if hasattr(backend, "encode_to_numpy"):  # tiktoken ≥ 0.8: no Python list of ints in between
                ids = backend.encode_to_numpy(joined, allowed_special={ENDOFTEXT}, disallowed_special=()).astype(dtype)
            else:
                ids = np.array(backend.encode(joined, allowed_special={ENDOFTEXT}, disallowed_special=()), dtype=dtype)
            return _split_at_ends(ids, eot, closes)
    encoded = tokenizer.encode_each(documents)
    counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(counts.sum()))
    if eot is not None:
        ends = np.cumsum(counts) if closes else np.cumsum(counts[:-1])  # an open document has no end yet
        ids = np.insert(ids, ends, eot)
        counts[: len(ends)] += 1
    return ids, counts


def _split_at_ends(ids: np.ndarray, eot: int, closes: bool) -> tuple[np.ndarray, np.ndarray]:
    ends = np.flatnonzero(ids == eot)
    counts = np.diff(ends, prepend=-1)
    if not closes:
        counts = np.append(counts, len(ids) - (int(ends[-1]) + 1 if len(ends) else 0))
    return ids, counts.astype(np.int64)


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
        writer = self.writer
        assert writer is not None, "only an open shard is closed"
        record = writer.close()  # if this fails, self.writer is still there for abort()
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
    """Takes results in corpus order: counts documents, tokens and bytes per input, splits the tokens
    (Splitter) and sends them to the split writers."""

    def __init__(self, writers: dict[str, SplitWriter], splitter: Splitter, sources: list[Source]):
        self.writers, self.splitter = writers, splitter
        self.inputs = [InputCount(source.label) for source in sources]
        self.documents = {"train": 0, "val": 0}
        self.replaced = 0  # invalid UTF-8 bytes read as U+FFFD by the workers

    def add(self, result: Tokenized) -> None:
        count = self.inputs[result.source]
        count.bytes += result.text_bytes
        self.replaced += result.replaced
        if len(result.counts) == 0:
            return
        train, val, started_to_val = self.splitter.split(result.tokens, result.counts, result.last_open)
        self.documents["val"] += int(np.count_nonzero(started_to_val))
        self.documents["train"] += len(started_to_val) - int(np.count_nonzero(started_to_val))
        count.documents += len(started_to_val)
        count.tokens += len(result.tokens)
        self.writers["train"].write(train)
        self.writers["val"].write(val)

    def finish(self) -> None:
        """Hand over what the splitter held back (the corpus's last block, which may go to val)."""
        train, val = self.splitter.finish()
        self.documents["train"] -= self.splitter.moved_documents
        self.documents["val"] += self.splitter.moved_documents
        self.writers["train"].write(train)
        self.writers["val"].write(val)

    @property
    def tokens(self) -> int:
        return self.writers["train"].tokens + self.writers["val"].tokens + self.splitter.held


# --- the run ---------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(requested: int) -> int:
    """0 means one per core this process may use; more than that is cut to it. Tokenizing is CPU-bound,
    so a worker beyond the cores only adds a process to start, feed and stop (100,000 of them once took
    a machine down for minutes)."""
    cores = usable_cores()
    return cores if requested <= 0 else min(requested, cores)


@dataclass
class Run:
    """One prepare run's moving parts, so an interruption can say where it stopped."""

    options: PrepareOptions
    sources: list[Source]
    tokenizer: Tokenizer
    workers: int
    staging: Path
    state: ReadState = field(default_factory=ReadState)
    assembler: Optional[Assembler] = None


def prepare(options: PrepareOptions, on_progress: Optional[ProgressFn] = None) -> PrepareSummary:
    """Tokenize `options.inputs` into shards under `options.out`; see the module docstring."""
    started = time.perf_counter()
    out = Path(options.out)
    sources = resolve_inputs(options.inputs)
    # The check and the write under the output's lock: no other command publishes `out` meanwhile.
    with output_lock(out, "gpt prepare", lambda: check_output_dir(out, options.force, sources)):
        tokenizer = load_tokenizer(options.data.tokenizer, options.data.vocab_dir)
        run = Run(options, sources, tokenizer, worker_count(options.data.workers), make_staging_dir(out))
        summary = _prepare_and_publish(run, on_progress, started)
    summary.out = out
    return summary


def _prepare_and_publish(run: "Run", on_progress: Optional[ProgressFn], started: float) -> PrepareSummary:
    """Tokenize into the run's staging dir and publish it as the output dir, or remove it on any failure."""
    out = Path(run.options.out)
    try:
        summary, manifest = _prepare_into(run, on_progress, started)
        write_manifest(run.staging, manifest)
        publish_dir(run.staging, out, PREPARED_DATA)
    except (KeyboardInterrupt, Stopped) as stop:  # Ctrl-C, or SIGTERM (the CLI raises Stopped for it)
        shutil.rmtree(run.staging, ignore_errors=True)
        raise Stopped(getattr(stop, "signal_number", signal.SIGINT), stopped_message(run, out)) from None
    except BaseException:
        shutil.rmtree(run.staging, ignore_errors=True)
        raise
    return summary


def next_command(out: Path, project: Project) -> str:
    """What to run after `gpt prepare`: the command that trains on the shards it just wrote."""
    import shlex

    from ..config import DEFAULT_PROJECT_FILE

    own = Path(project.data.dir).resolve() == Path(out).resolve()
    data = "" if own else " --set " + shlex.quote(f"data.dir={json.dumps(str(out))}")
    if project.source is None:
        return f"gpt init --preset nano (a model sized for a CPU; --preset gpt2 on a GPU), then gpt train{data}"
    named = "" if project.source == DEFAULT_PROJECT_FILE else f" --project {shlex.quote(project.source)}"
    if project.data.sources:  # a mixture reads its [[data.sources]], not data.dir
        if any(Path(entry.dir).resolve() == Path(out).resolve() for entry in project.data.sources):
            return f"gpt train{named}"
        return (f'add {{ name = "...", dir = {json.dumps(str(out))}, weight = ... }} to the [[data.sources]] of '
                f"{project.source}, then gpt train{named}")
    return f"gpt train{named}{data}"


def stopped_message(run: Run, out: Path) -> str:
    """Where an interrupted run stopped, and that nothing was published."""
    done = (f"{sum(run.assembler.documents.values()):,} documents, {run.assembler.tokens:,} tokens"
            if run.assembler else "nothing")
    where = ""
    if run.sources and run.state.source < len(run.sources):
        where = f" while reading {run.sources[run.state.source].label} (input {run.state.source + 1} of {len(run.sources)})"
    previous = "left as it was" if out.exists() else "not created"
    return f"gpt prepare stopped{where} after tokenizing {done}; nothing was published: {out} {previous}."


def _prepare_into(run: Run, on_progress: Optional[ProgressFn], started: float):
    options, tokenizer = run.options, run.tokenizer
    writers = {split: SplitWriter(run.staging, split, options.data.shard_tokens, tokenizer) for split in ("train", "val")}
    splitter = Splitter(options.seed, options.data.val_fraction, options.data.val_block_tokens)
    run.assembler = assembler = Assembler(writers, splitter, run.sources)
    total_bytes = sum(s.size for s in run.sources) if all(s.size for s in run.sources) else 0
    reading = time.perf_counter()
    try:
        for result, done_bytes in _tokenized(read_tasks(run.sources, options.read_settings, run.state), run):
            assembler.add(result)
            if on_progress:
                on_progress(Progress(done_bytes, total_bytes, sum(assembler.documents.values()), assembler.tokens,
                                     time.perf_counter() - reading))
        assembler.finish()
        records = writers["train"].finish() + writers["val"].finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if sum(assembler.documents.values()) == 0:
        labels = ", ".join(s.label for s in run.sources[:3]) + (", ..." if len(run.sources) > 3 else "")
        raise GptError(f"The input ({labels}) holds no text: nothing to prepare.")
    summary = PrepareSummary(out=run.staging, documents=dict(assembler.documents),
                             tokens={s: w.tokens for s, w in writers.items()},
                             shards={s: len(w.records) for s, w in writers.items()},
                             bytes=sum(count.bytes for count in assembler.inputs),
                             replaced_bytes=run.state.replaced + assembler.replaced,
                             seconds=time.perf_counter() - started, workers=run.workers,
                             split=splitter.report(), inputs=assembler.inputs)
    summary.warnings = _warnings(summary, splitter)
    if options.data.workers > run.workers:
        summary.warnings.append(f"--workers {options.data.workers:,} is more than the {run.workers} CPU core(s) this "
                                f"process may use; {run.workers} worker(s) were used.")
    return summary, build_manifest(summary, run, records)


def _tokenized(tasks, run: Run):
    """(result, bytes read from disk when its task was cut) in task order. One worker tokenizes in this process; more use worker processes with a
    bounded number of tasks in flight (Pool.imap would read the whole corpus ahead). Processes, not
    threads: tiktoken's per-call work is short and the Python around it holds the GIL, so two threads
    measured 0.9x one thread here. ProcessPoolExecutor rather than Pool: a worker that dies (OOM killer)
    breaks the run with an error instead of leaving it waiting forever for the lost task."""
    if run.workers == 1:
        for task in tasks:
            yield tokenize_task(task, run.tokenizer), run.state.disk_bytes
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    data = run.options.data
    executor = ProcessPoolExecutor(run.workers, mp_context=_worker_context(), initializer=_init_worker,
                                   initargs=(data.tokenizer, data.vocab_dir, os.getpid()))
    gc.freeze()  # what the workers inherit (modules, vocabulary) is never scanned by their collections
    try:
        executor.submit(int).result()  # start every worker now, before reading starts any thread (see below)
    finally:
        gc.unfreeze()
    pending: collections.deque[tuple[Future[Tokenized], int]] = collections.deque()  # (its result, bytes read)
    try:
        for task in tasks:
            pending.append((executor.submit(tokenize_task, task), run.state.disk_bytes))
            if len(pending) >= run.workers * TASKS_PER_WORKER:
                future, done_bytes = pending.popleft()
                yield future.result(), done_bytes
        while pending:
            future, done_bytes = pending.popleft()
            yield future.result(), done_bytes
    except BrokenProcessPool:
        raise GptError("A tokenizer worker process died (out of memory?); try fewer --workers.") from None
    finally:
        for future, _ in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_context():
    """Fork where there is fork: workers share the loaded vocabulary and start in milliseconds. It is
    safe because every worker is forked at once, before this process runs any other thread (the
    progress bar starts on the first result; pyarrow's threads come with the first dataset read), and
    ProcessPoolExecutor never forks a replacement mid-run. Spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _warnings(summary: PrepareSummary, splitter: Splitter) -> list[str]:
    warnings = []
    if summary.replaced_bytes:
        warnings.append(f"{summary.replaced_bytes:,} invalid UTF-8 bytes were read as U+FFFD.")
    warnings.extend(splitter.warnings())
    if summary.tokens["train"] == 0:
        warnings.append("No document was drawn for train.")
    return warnings


def build_manifest(summary: PrepareSummary, run: Run, records: list[ShardRecord]) -> dict:
    tokenizer, data = run.tokenizer, run.options.data
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                      "eot_position": "end" if tokenizer.eot_id is not None else None},
        "inputs": [{"kind": s.kind, "location": s.label, "documents": c.documents, "tokens": c.tokens,
                    "bytes": c.bytes} for s, c in zip(run.sources, summary.inputs, strict=True)],
        "separator": data.separator,
        "text_column": data.text_column,
        "split": {"val_fraction": data.val_fraction, "seed": run.options.seed, **summary.split},
        "documents": sum(summary.documents.values()),
        "documents_by_split": summary.documents,
        "tokens": summary.tokens,
        "bytes": summary.bytes,
        "replaced_bytes": summary.replaced_bytes,
        "shard_tokens": data.shard_tokens,
        "seconds": round(summary.seconds, 3),
        "shards": [{"file": r.file, "split": r.split, "tokens": r.tokens, "sha256": r.sha256, "max_id": r.max_id}
                   for r in records],
    }


# --- the output directory --------------------------------------------------------------------------------------


def check_output_dir(out: Path, force: bool, sources: list[Source]) -> None:
    """Refuse before any work: a file in the way, a non-empty dir without --force, and even with --force a
    dir holding files `gpt prepare` did not write, or an input of this run."""
    check_replaceable(out, force=force, what=PREPARED_DATA, inputs=[s.path for s in sources if s.path],
                      owned=_owned_by_manifest(out))


def _owned_by_manifest(out: Path) -> Optional[set[str]]:
    """For a dir prepared before the tool listed what it wrote: the manifest and the shards it lists."""
    if not out.is_dir() or read_owned(out) is not None:
        return None
    try:
        data = open_prepared(out)
    except GptError:
        return None
    return {MANIFEST} | {shard.path.name for shards in data.splits.values() for shard in shards}


def make_staging_dir(out: Path) -> Path:
    try:
        return staging_dir(out, "prepare")
    except OSError as error:
        raise GptError(f"Cannot write the output dir {out}: {error.strerror or error}.") from None


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
