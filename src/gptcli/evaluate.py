"""Loss, perplexity and bits per byte with a sliding window.

A sequence longer than the context is scored window by window, as in the transformers guide "Perplexity
of fixed-length models": windows of `context` tokens start every `stride` tokens; the first window scores
all of its targets, each later one only the targets the previous window had not reached, so every token is
scored once, with the most context the window allows. With stride = context the windows do not overlap
and the first token of each window is not scored (it has no context inside its window).

Two averages come out:
- `loss`: the exact mean negative log-likelihood per scored token (total nats / scored tokens);
  `perplexity` = exp(loss). This is the number gptcli reports as loss.
- `hf_loss`: the guide's number, which weights each window's mean loss by (scored labels - 1) — one less
  than it scored for every window after the first when windows overlap. Kept to compare with published
  figures; it equals `loss` when stride = context.

Bits per byte = total nats / UTF-8 bytes of the scored tokens / ln 2, which does not depend on the
tokenizer, so models with different vocabularies compare.

That is next-token scoring (under the model's own pattern: a "document" model's windows are scored within
their documents). A run trained with another objective is scored under it (objective_eval.py): its windows
laid out as in training with draws of a fixed seed, or the conditional splits of a file.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import Project, read_toml
from .errors import GptError, UsageError
from .machine import check_scoring_fits, check_text_fits
from .model import GPT
from .objectives import CONDITIONAL, NEXT_TOKEN, Objective, objective_spec
from .paths import MIB, check_input, read_input_text

# Rows of hidden states projected to the vocabulary at once: 1024 × 50257 fp32 logits = 206 MB.
HEAD_CHUNK = 1024


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of a sequence; the model scores the last `scored` tokens of it."""

    begin: int
    end: int
    scored: int
    labels: int  # targets the transformers recipe counts for this window (its trg_len)

    @property
    def length(self) -> int:
        return self.end - self.begin


def plan_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """The sliding windows of the transformers recipe over a sequence of `num_tokens` ids."""
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        labels = end - previous_end  # targets not scored by an earlier window
        # The first position of a window has nothing to predict it from inside the window.
        scored = min(labels, end - begin - 1)
        if scored > 0:
            windows.append(Window(begin, end, scored, labels))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@dataclass
class Totals:
    """Running sums; float64 so that millions of tokens add up without drift."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0
    hf_weighted_nats: float = 0.0  # Σ window mean loss × (labels - 1), the transformers recipe
    hf_weight: int = 0

    def add(self, other: "Totals") -> None:
        """Sum another's counts into these (a mixture's sources into its total)."""
        for name in ("nats", "tokens", "bytes", "windows", "hf_weighted_nats", "hf_weight"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def add_window(self, window: Window, nats: float, num_bytes: int) -> None:
        self.nats += nats
        self.tokens += window.scored
        self.bytes += num_bytes
        self.windows += 1
        self.hf_weighted_nats += nats / window.scored * (window.labels - 1)
        self.hf_weight += window.labels - 1


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    hf_loss: float
    hf_perplexity: float
    windows: int
    context: int
    stride: int
    source: str
    seconds: float
    extra: dict = field(default_factory=dict)
    sources: dict[str, "EvalResult"] = field(default_factory=dict)  # a mixture's split: each source's own

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "hf_loss": self.hf_loss,
                "hf_perplexity": self.hf_perplexity, "windows": self.windows, "context": self.context,
                "stride": self.stride, "source": self.source, "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
                **self.extra, **self.sources_json()}

    def sources_json(self) -> dict:
        """{"sources": {name: loss, perplexity, bits per byte, tokens, bytes}} for a mixture; {} otherwise."""
        if not self.sources:
            return {}
        return {"sources": {name: {"loss": r.loss, "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte,
                                   "tokens": r.tokens, "bytes": r.bytes} for name, r in self.sources.items()}}


def result_from(totals: Totals, context: int, stride: int, source: str, seconds: float) -> EvalResult:
    if totals.tokens == 0:
        raise GptError(f"{source} has no token to score: it needs at least 2 tokens.")
    loss = totals.nats / totals.tokens
    hf_loss = totals.hf_weighted_nats / totals.hf_weight if totals.hf_weight else loss
    bits_per_byte = totals.nats / totals.bytes / math.log(2) if totals.bytes else float("nan")
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=bits_per_byte, tokens=totals.tokens,
                      bytes=totals.bytes, hf_loss=hf_loss, hf_perplexity=math.exp(hf_loss), windows=totals.windows,
                      context=context, stride=stride, source=source, seconds=seconds)


# --- scoring ---------------------------------------------------------------------------------------------


def resolve_stride(stride: int, context: int) -> int:
    """0 means the full context; a stride longer than the model's context (known once the model is loaded;
    the loader checked [eval] stride ≥ 0) is a user error."""
    if stride == 0:
        return context
    if stride > context:
        raise GptError(f"The stride {stride} is longer than the model's context of {context} tokens; "
                       "tokens between windows would never be scored.")
    return stride


def window_nats(model: GPT, batch: torch.Tensor, windows: list[Window]) -> list[float]:
    """Summed negative log-likelihood of each window's scored targets.

    batch: (B, T) token ids of B windows of equal length T. Only the hidden states that predict a scored
    target are projected to the vocabulary, a chunk at a time, so memory stays at HEAD_CHUNK × V logits.
    """
    hidden = model.hidden_states(batch)  # (B, T, C)
    T = batch.size(1)
    input_rows, target_rows = [], []
    for row, window in enumerate(windows):
        first = T - window.scored  # first scored target; predicted by the position before it
        input_rows.append(hidden[row, first - 1: T - 1])  # (scored, C)
        target_rows.append(batch[row, first:])  # (scored,)
    inputs, targets = torch.cat(input_rows), torch.cat(target_rows)  # (N, C), (N,)
    nll = torch.empty(targets.numel(), dtype=torch.float64, device=batch.device)
    for start in range(0, targets.numel(), HEAD_CHUNK):
        logits = model.head(inputs[start:start + HEAD_CHUNK]).float()  # (chunk, V)
        nll[start:start + HEAD_CHUNK] = F.cross_entropy(logits, targets[start:start + HEAD_CHUNK], reduction="none")
    return [part.sum().item() for part in nll.split([w.scored for w in windows])]


def window_batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, at most batch_size at a time (only the last window is shorter)."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.length != batch[0].length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def score_sequence(model: GPT, tokens: np.ndarray, totals: Totals, stride: int, batch_size: int,
                   byte_count: Callable[[np.ndarray], int], autocast,
                   progress: Optional[Callable[[int], None]]) -> None:
    """Add one sequence of ids (1-D array) to `totals`, window by window."""
    device = model.wte.weight.device
    for batch in window_batches(plan_windows(len(tokens), model.config.block_size, stride), batch_size):
        ids = np.stack([np.asarray(tokens[w.begin:w.end], dtype=np.int64) for w in batch])  # (B, T)
        with autocast:
            nats = window_nats(model, torch.from_numpy(ids).to(device), batch)
        for window, window_sum in zip(batch, nats, strict=True):
            totals.add_window(window, window_sum, byte_count(tokens[window.end - window.scored:window.end]))
        if progress is not None:
            progress(sum(w.scored for w in batch))


def evaluate_sequences(model: GPT, tokenizer, sequences: Iterable[np.ndarray], *, source: str, stride: int = 0,
                       batch_size: int = 8, bf16: bool = False,
                       progress: Optional[Callable[[int], None]] = None) -> EvalResult:
    """Score token sequences (each a 1-D array of ids; windows never cross from one to the next)."""
    return evaluate_parts(model, tokenizer, {"": list(sequences)}, source=source, stride=stride, batch_size=batch_size,
                          bf16=bf16, progress=progress)


def evaluate_parts(model: GPT, tokenizer, parts: dict[str, list[np.ndarray]], *, source: str, stride: int = 0,
                   batch_size: int = 8, bf16: bool = False,
                   progress: Optional[Callable[[int], None]] = None) -> EvalResult:
    """Score the sequences of each part (a mixture's sources by name; one part named "" for anything else):
    the result is over all of them, each named part's own in `sources`."""
    context = model.config.block_size
    stride = resolve_stride(stride, context)
    device_type = model.wte.weight.device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
    totals = {name: Totals() for name in parts}

    def byte_count(ids: np.ndarray) -> int:
        return len(tokenizer.decode_bytes(np.asarray(ids).tolist()))

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for name, sequences in parts.items():
                for tokens in sequences:
                    score_sequence(model, tokens, totals[name], stride, batch_size, byte_count, autocast, progress)
    finally:
        model.train(was_training)
    if device_type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    overall = Totals()
    for part in totals.values():
        overall.add(part)
    result = result_from(overall, context, stride, source, seconds)
    result.sources = {name: result_from(part, context, stride, f"{source}: {name}", seconds)
                      for name, part in totals.items() if name}
    return result


# --- where the tokens come from --------------------------------------------------------------------------


def scored_count(lengths: Iterable[int], context: int, stride: int) -> int:
    """How many tokens sequences of these lengths will score (for a progress bar's total)."""
    return sum(w.scored for n in lengths for w in plan_windows(n, context, stride))


# What --text may grow by between its size is checked and it is read (a file still being written).
TEXT_GROWTH_BYTES = MIB


def text_tokens(path: Path | str, tokenizer, max_tokens: int = 0) -> np.ndarray:
    """A UTF-8 text file → its ids (the first max_tokens + 1 when max_tokens > 0)."""
    path = Path(path)
    if path.is_dir():
        raise GptError(f"{path} is a directory; --text takes one UTF-8 text file.")
    size = check_input(path, "Text file").st_size  # a regular file: never a device or a FIFO
    check_text_fits(size, "cpu")
    text = read_input_text(path, "Text file", size + TEXT_GROWTH_BYTES)
    return tokenize_for_scoring(text, tokenizer, max_tokens, f"Text file {path}")


def tokenize_for_scoring(text: str, tokenizer, max_tokens: int, what: str) -> np.ndarray:
    if not text.strip():
        raise GptError(f"{what} is empty: there is nothing to score.")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < 2:
        raise GptError(f"{what} holds {len(ids)} token; scoring needs at least 2.")
    return ids[: max_tokens + 1] if max_tokens > 0 else ids


def dataset_tokens(name: str, split: str, column: str, tokenizer, max_tokens: int = 0) -> np.ndarray:
    """A Hugging Face dataset, opened as `gpt prepare` opens one (sources.open_dataset: a save_to_disk dir,
    hf:NAME[/CONFIG], NAME:CONFIG or NAME): the `column` of every record, joined by blank lines as the
    transformers guide does for wikitext."""
    from .data.sources import dataset_texts, open_dataset

    label = f"Dataset {name} ({split})"
    texts = dataset_texts(open_dataset(name, split), column, f"Dataset {name}")
    return tokenize_for_scoring("\n\n".join(texts), tokenizer, max_tokens, label)


def split_sequences(project: Project, split: str, tokenizer, max_tokens: int = 0) -> tuple[list[np.ndarray], str]:
    """One split of the project's data source, as the source cuts it into sequences to score (a prepared dir:
    each shard one sequence, memory-mapped), at most max_tokens of it scored; and its name."""
    parts, name = split_parts(project, split, tokenizer, max_tokens)
    return [sequence for sequences in parts.values() for sequence in sequences], name


def split_parts(project: Project, split: str, tokenizer, max_tokens: int = 0) -> tuple[dict[str, list[np.ndarray]], str]:
    """One split of the project's data source as sequences to score, by source for a mixture (each source's at
    most max_tokens scored; one part named "" for one dir); and its name."""
    from .data.source import open_source

    source = open_source(project.data)
    source.check_tokenizer(tokenizer.fingerprint, tokenizer.vocab_size)
    if not source.tokens(split):
        raise GptError(f"{source.description} has no {split} tokens to score (see [data] val_fraction, or use "
                       "--split train).")
    parts = {name: part.sequences(split, tokenizer.vocab_size, max_tokens)
             for name, part in source.evaluated_parts().items()
             if part.tokens(split)}  # a source without that split has no row
    return parts, f"{source.description} ({split})"


# --- gpt eval --------------------------------------------------------------------------------------------


def eval_input(project: Project, tokenizer, *, dataset: Optional[str] = None,
               dataset_split: str = "test") -> tuple[dict[str, list[np.ndarray]], str]:
    """What `gpt eval` scores, by part (a mixture's sources by name, else one part named ""), and its name:
    `dataset`, else [eval] text (which `--text` overrides), else the [eval] split of the project's shards; at
    most [eval] max_tokens of it (of each source of a mixture)."""
    settings = project.eval
    if dataset is not None:
        tokens = dataset_tokens(dataset, dataset_split, project.data.text_column, tokenizer, settings.max_tokens)
        return {"": [tokens]}, f"{dataset} ({dataset_split})"
    if settings.text:
        return {"": [text_tokens(settings.text, tokenizer, settings.max_tokens)]}, settings.text
    return split_parts(project, settings.split, tokenizer, settings.max_tokens)


def evaluate_project(project: Project, *, checkpoint: Optional[Path] = None, device: str = "auto",
                     bf16: bool = False, dataset: Optional[str] = None, dataset_split: str = "test",
                     progress: Optional[Callable[[int, int], None]] = None) -> EvalResult:
    """`gpt eval`: score the model of `checkpoint` (else the project's run dir) on `eval_input`, with the
    project's [eval] settings (options of the command line already applied as overrides), under the run's
    objective (run_objective): next-token perplexity (a mixture's split also source by source,
    `EvalResult.sources`), else objective_eval's; [eval] splits: those sets.

    progress(scored, total) is called after every batch of windows (tokens; windows for an objective)."""
    from .runtime import load_project_model, resolve_device

    target = resolve_device(device)
    loaded = load_project_model(project, checkpoint, target)
    objective, options = run_objective(project, loaded.path)
    if project.eval.splits is not None:
        return evaluate_splits(project, loaded, objective, bf16=bf16, progress=progress)
    if objective.name != NEXT_TOKEN.name:
        return evaluate_objective(project, loaded, objective, options, bf16=bf16, dataset=dataset,
                                  dataset_split=dataset_split, progress=progress)
    context = loaded.config.block_size
    stride = resolve_stride(project.eval.stride, context)
    parts, source = eval_input(project, loaded.tokenizer, dataset=dataset, dataset_split=dataset_split)
    sequences = [sequence for part in parts.values() for sequence in part]
    total, done = scored_count((len(s) for s in sequences), context, stride), 0
    windows = total // stride + len(sequences)  # at least as many as plan_windows makes
    check_scoring_fits(loaded.config, min(project.eval.batch_size, windows), target.type)

    def advance(scored: int) -> None:
        nonlocal done
        done += scored
        if progress is not None:
            progress(done, total)

    return evaluate_parts(loaded.model, loaded.tokenizer, parts, source=source, stride=stride,
                          batch_size=project.eval.batch_size, bf16=bf16, progress=advance)


# --- under an objective -----------------------------------------------------------------------------------


def run_objective(project: Project, model_dir: Path) -> tuple[Objective, dict]:
    """The objective a model is scored under, with its options: the project's train.objective when the
    project (or --set) gives it, else the one its run trained with (RUN/config.resolved.toml beside a run's
    model/), else next_token."""
    from .rundir import MODEL_DIR, RESOLVED_CONFIG

    train = project.train
    resolved = Path(model_dir).parent / RESOLVED_CONFIG
    if "train.objective" not in project.given and Path(model_dir).name == MODEL_DIR and resolved.is_file():
        section = read_toml(resolved).get("train", {})
        name, options = section.get("objective", NEXT_TOKEN.name), section.get("objective_options", {})
    else:
        name, options = train.objective, train.objective_options
    objective = objective_spec(name)
    return objective, objective.option_values(options)


def eval_seed(project: Project) -> int:
    return project.eval.seed if project.eval.seed is not None else project.project.seed


def autocast_for(model: GPT, bf16: bool):
    return torch.autocast(model.wte.weight.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def byte_counter(tokenizer) -> Callable[[list[int]], int]:
    return lambda ids: sum(len(tokenizer.decode_bytes([i])) for i in ids)


def evaluate_objective(project: Project, loaded, objective: Objective, options: dict, *, bf16: bool,
                       dataset: Optional[str], dataset_split: str,
                       progress: Optional[Callable[[int, int], None]]) -> EvalResult:
    """The eval input cut into windows of seq_len + 1 tokens (at most the model's context), each scored as the
    objective counts it, with its draws seeded by [eval] seed (objective_eval.py)."""
    from .objective_eval import cut_windows, objective_batches, score_batches

    parts, source = eval_input(project, loaded.tokenizer, dataset=dataset, dataset_split=dataset_split)
    sequences = [sequence for part in parts.values() for sequence in part]  # a mixture's sources, one set
    length = eval_length(project, loaded.config)
    windows = cut_windows(sequences, length + 1)
    if not len(windows):
        raise GptError(f"{source} holds no window of {length + 1} tokens to score under objective {objective.name}.")
    seed, start = eval_seed(project), time.perf_counter()
    batches = objective_batches(windows, objective, options, seed, project.eval.batch_size, loaded.model.wte.weight.device)
    scored = score_batches(loaded.model, batches, byte_counter(loaded.tokenizer), autocast_for(loaded.model, bf16),
                           window_progress(progress, len(windows)))
    return objective_result(scored, objective, source, length, time.perf_counter() - start, seed=seed)


def eval_length(project: Project, config) -> int:
    """Slots of an evaluation window: train.seq_len, at most the model's learned positions."""
    return min(project.seq_len, config.block_size) if config.position == "learned" else project.seq_len


def window_progress(progress: Optional[Callable[[int, int], None]], total: int) -> Callable[[int], None]:
    done = 0

    def advance(windows: int) -> None:
        nonlocal done
        done += windows
        if progress is not None:
            progress(done, total)

    return advance


def objective_result(scored, objective: Objective, source: str, length: int, seconds: float, **extra) -> EvalResult:
    totals = Totals(nats=scored.nats, tokens=scored.tokens, bytes=scored.bytes, windows=scored.windows)
    result = result_from(totals, length, length + 1, source, seconds)
    result.extra = {"objective": objective.name, **extra}
    return result


def evaluate_splits(project: Project, loaded, objective: Objective, *, bf16: bool,
                    progress: Optional[Callable[[int, int], None]]) -> EvalResult:
    """NLL of X_e given X_c on the splits of [eval] splits: by the conditional layout for a conditional run,
    by revealing X_e token by token for a masked LM (objective_eval.unmasking_batches)."""
    from .objective_eval import check_splits_fit, read_splits, score_batches, split_batches, unmasking_batches

    path = project.eval.splits
    assert path is not None, "evaluate_project calls this with [eval] splits set"
    splits = read_splits(path)
    check_splits_fit(splits, loaded.config, loaded.tokenizer.fingerprint, path)
    device = loaded.model.wte.weight.device
    if objective.name == CONDITIONAL.name:
        batches = split_batches(splits, project.eval.batch_size, device)
    elif objective.name == "masked_lm":
        batches = unmasking_batches(splits, project.eval.batch_size, device)
    else:
        raise GptError(f"Conditional splits ({path}) score a run trained with objective conditional or masked_lm; "
                       f'this one was trained with "{objective.name}".')
    start = time.perf_counter()
    scored = score_batches(loaded.model, batches, byte_counter(loaded.tokenizer), autocast_for(loaded.model, bf16),
                           window_progress(progress, len(splits.windows)))
    return objective_result(scored, objective, f"{path} ({splits.source})", splits.window_tokens,
                            time.perf_counter() - start, seed=splits.seed, splits=str(path))


def write_project_splits(project: Project, count: int, *, dataset: Optional[str] = None,
                         dataset_split: str = "test") -> dict:
    """`gpt eval --write-splits N`: conditional sets for the first N windows of the eval input, drawn with
    [eval] seed by the conditional objective's rule (the project's options when it trains conditional), into
    the file [eval] splits names; returns what was written."""
    from .objective_eval import cut_windows, draw_splits, write_splits
    from .tokenizer import load_tokenizer

    path = project.eval.splits
    if path is None:
        raise UsageError("--write-splits: name the file to write with --splits FILE.")
    tokenizer = load_tokenizer(project.data.tokenizer, project.data.vocab_dir)
    parts, source = eval_input(project, tokenizer, dataset=dataset, dataset_split=dataset_split)
    sequences = [sequence for part in parts.values() for sequence in part]
    given = project.train.objective_options if project.train.objective == CONDITIONAL.name else {}
    options = CONDITIONAL.option_values(given)
    windows = cut_windows(sequences, project.seq_len + 1)
    splits = draw_splits(windows, count, eval_seed(project), options, source, tokenizer.fingerprint, project.seq_len)
    write_splits(Path(path), splits)
    return {"splits": str(path), "windows": count, "window_tokens": splits.window_tokens, "seed": splits.seed,
            "condition": sum(len(c) for _, c, _ in splits.windows), "evaluate": sum(len(e) for _, _, e in splits.windows)}
