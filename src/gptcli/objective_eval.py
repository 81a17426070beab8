"""`gpt eval` under an objective other than next_token, and the conditional objective's fixed splits.

The text to score is cut into consecutive windows of seq_len + 1 tokens (as the loader cuts the shards),
each laid out as the objective lays out a training window (objectives.py), its draw keyed by
(EVAL_STREAM, window index) and the seed: so `--seed S` scores the same draws on every run and any model.
What is scored is what the objective counts: the suffix after the prefix (prefix_lm), the hidden tokens
(masked_lm), X_e given X_c (conditional), each token's negative log-likelihood summed in float64.

Conditional splits fix X_c and X_e beyond the seed: `gpt eval --write-splits N --seed S --splits FILE` draws
them for the first N windows of the text by the objective's rule and writes the windows' tokens with them,
so models are compared on the very same tokens and sets, whatever data dir or seed they are given later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import GptError
from .fsutil import atomic_write_json, check_output
from .model import GPT
from .objectives import (
    CONDITIONAL,
    EVAL_STREAM,
    Batch,
    Objective,
    conditional_slots,
    conditional_window,
    draw_condition,
    keys_for,
    window_rng,
)

SPLITS_FORMAT = "gptcli-conditional-splits"
SPLITS_VERSION = 1
HEAD_ROWS = 1024  # counted rows projected to the vocabulary at once (as evaluate.HEAD_CHUNK)


@dataclass
class Scored:
    """Sums over the scored tokens (float64 nats)."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0


def cut_windows(sequences: list[np.ndarray], window_tokens: int) -> np.ndarray:
    """Consecutive, non-overlapping windows of `window_tokens` ids from each sequence, (W, window_tokens); a
    sequence's last (shorter) piece is not scored."""
    pieces = [np.asarray(tokens[start:start + window_tokens], dtype=np.int64)
              for tokens in sequences for start in range(0, len(tokens) - window_tokens + 1, window_tokens)]
    return np.stack(pieces) if pieces else np.zeros((0, window_tokens), dtype=np.int64)


def counted_nats(model: GPT, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood (n,) float64, target ids (n,)) of every counted slot of `batch`, in row-major
    order; only the counted rows go through the vocabulary projection."""
    hidden = model.hidden_states(batch.inputs, **batch.model_inputs())  # (B, L, C)
    counted = batch.targets != -100  # (B, L)
    rows, targets = hidden[counted], batch.targets[counted]  # (n, C), (n,)
    nll = torch.empty(targets.numel(), dtype=torch.float64, device=rows.device)
    for start in range(0, targets.numel(), HEAD_ROWS):
        logits = model.head(rows[start:start + HEAD_ROWS]).float()  # (chunk, V)
        nll[start:start + HEAD_ROWS] = F.cross_entropy(logits, targets[start:start + HEAD_ROWS], reduction="none")
    return nll, targets


def score_batches(model: GPT, batches: Iterator[tuple[Batch, int]], byte_count: Callable[[list[int]], int],
                  autocast, progress: Optional[Callable[[int], None]] = None) -> Scored:
    """Add up (batch, windows in it) pairs: nats, counted tokens, the UTF-8 bytes of the counted tokens."""
    scored = Scored()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch, windows in batches:
                with autocast:
                    nll, targets = counted_nats(model, batch)
                scored.nats += nll.sum().item()
                scored.tokens += targets.numel()
                scored.bytes += byte_count(targets.tolist())
                scored.windows += windows
                if progress is not None:
                    progress(windows)
    finally:
        model.train(was_training)
    return scored


def objective_batches(windows: np.ndarray, objective: Objective, options: Mapping, seed: int, batch_size: int,
                      device: torch.device) -> Iterator[tuple[Batch, int]]:
    """The windows (W, N) in batches, each laid out by the objective with its draw keyed by its index."""
    for first in range(0, len(windows), batch_size):
        chunk = torch.from_numpy(windows[first:first + batch_size]).to(device)
        yield objective.batch(chunk, keys_for(EVAL_STREAM, first, len(chunk)), seed, options), len(chunk)


# --- conditional splits -------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Fixed conditional evaluation sets: each window's tokens, X_c (sorted) and X_e (in evaluation order)."""

    seed: int
    window_tokens: int
    source: str
    tokenizer: str  # the tokenizer's fingerprint: the ids mean these tokens
    options: dict
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": SPLITS_FORMAT, "version": SPLITS_VERSION, "objective": CONDITIONAL.name,
                "seed": self.seed, "window_tokens": self.window_tokens, "source": self.source,
                "tokenizer": self.tokenizer, "options": self.options,
                "windows": [{"tokens": tokens.tolist(), "condition": condition.tolist(), "evaluate": evaluate.tolist()}
                            for tokens, condition, evaluate in self.windows]}


def draw_splits(windows: np.ndarray, count: int, seed: int, options: Mapping, source: str, tokenizer: str,
                length: int) -> Splits:
    """X_c and X_e of the first `count` windows, by the conditional objective's rule (draw_condition) over
    the n tokens its layout covers in `length` slots; window i's draw is keyed by (EVAL_STREAM, i)."""
    if len(windows) < count:
        raise GptError(f"--write-splits {count}: {source} holds {len(windows)} windows of {windows.shape[1]} tokens; "
                       "ask for fewer, or score more text.")
    n = conditional_window(length, options["min_condition_fraction"])
    splits = Splits(seed=seed, window_tokens=n, source=source, tokenizer=tokenizer, options=dict(options))
    for index in range(count):
        condition, evaluate = draw_condition(window_rng(seed, (EVAL_STREAM, index)), n, options)
        splits.windows.append((windows[index, :n], condition, evaluate))
    return splits


def write_splits(path: Path, splits: Splits) -> Path:
    """The splits as JSON at `path` (never half-written; a file that is not a splits file is not replaced)."""
    path = Path(path)
    check_output(path, what="splits file", directory=False, replaces=is_splits_file,
                 instead="choose another --splits file")
    atomic_write_json(path, splits.to_json())
    return path


def is_splits_file(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == SPLITS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_splits(path: Path | str) -> Splits:
    """A splits file, checked: its format, and each window's sets disjoint and inside the window."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptError(f"Splits file {path} does not exist (write one with gpt eval --write-splits N).") from None
    except (OSError, ValueError) as error:
        raise GptError(f"Cannot read the splits file {path}: {error}.") from None
    if not isinstance(raw, dict) or raw.get("format") != SPLITS_FORMAT or raw.get("version") != SPLITS_VERSION:
        raise GptError(f"{path} is not a gptcli conditional splits file (version {SPLITS_VERSION}); write one with "
                       "gpt eval --write-splits N.")
    splits = Splits(seed=raw["seed"], window_tokens=raw["window_tokens"], source=raw["source"],
                    tokenizer=raw["tokenizer"], options=raw.get("options", {}))
    for number, window in enumerate(raw["windows"]):
        tokens, condition, evaluate = (np.asarray(window[key], dtype=np.int64)
                                       for key in ("tokens", "condition", "evaluate"))
        both = np.concatenate([condition, evaluate])
        if len(evaluate) == 0 or len(np.unique(both)) != len(both) or both.min() < 0 or both.max() >= len(tokens):
            raise GptError(f"{path}: window {number} needs disjoint condition and evaluate positions inside its "
                           f"{len(tokens)} tokens, and at least one to evaluate.")
        splits.windows.append((tokens, condition, evaluate))
    return splits


def split_batches(splits: Splits, batch_size: int, device: torch.device) -> Iterator[tuple[Batch, int]]:
    """The splits' windows in batches, laid out over the longest layout of the batch (|X_c| + 2·|X_e|)."""
    for first in range(0, len(splits.windows), batch_size):
        chunk = splits.windows[first:first + batch_size]
        length = max(len(condition) + 2 * len(evaluate) for _, condition, evaluate in chunk)
        width = max(len(tokens) for tokens, _, _ in chunk)
        tokens = np.zeros((len(chunk), width), dtype=np.int64)
        for row, (ids, _, _) in enumerate(chunk):
            tokens[row, :len(ids)] = ids
        windows = torch.from_numpy(tokens).to(device)
        yield conditional_slots(windows, [(condition, evaluate) for _, condition, evaluate in chunk], length), len(chunk)


def unmasking_batches(splits: Splits, batch_size: int, device: torch.device) -> Iterator[tuple[Batch, int]]:
    """The splits scored by a masked LM: X_e revealed one token at a time in evaluation order, so that
    P(X_e | X_c) = Π_i P(e_i | X_c, e_<i) with every other token hidden; one row per evaluation token (a
    window counts once, with its last row)."""
    rows: list[tuple[np.ndarray, np.ndarray, int, bool]] = []  # tokens, shown positions, target, last of its window
    for tokens, condition, evaluate in splits.windows:
        for step, target in enumerate(evaluate):
            rows.append((tokens, np.concatenate([condition, evaluate[:step]]), int(target), step == len(evaluate) - 1))
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        width = max(len(tokens) for tokens, _, _, _ in chunk)
        inputs = np.zeros((len(chunk), width), dtype=np.int64)
        hidden = np.ones((len(chunk), width), dtype=bool)
        targets = np.full((len(chunk), width), -100, dtype=np.int64)
        for row, (tokens, shown, target, _) in enumerate(chunk):
            inputs[row, :len(tokens)] = tokens
            hidden[row, shown] = False
            targets[row, target] = tokens[target]
        batch = Batch(inputs=torch.from_numpy(inputs).to(device), targets=torch.from_numpy(targets).to(device),
                      hidden_tokens=torch.from_numpy(hidden).to(device))
        yield batch, sum(last for _, _, _, last in chunk)


def check_splits_fit(splits: Splits, config, fingerprint: str, path: Path | str) -> None:
    """The model must read the splits' token ids as the same tokens, and hold their positions."""
    if splits.tokenizer != fingerprint:
        raise GptError(f"The splits in {path} hold token ids of another tokenizer ({splits.tokenizer}) than the "
                       f"model's ({fingerprint}); write splits with this model's tokenizer.")
    longest = max(len(tokens) for tokens, _, _ in splits.windows)
    if config.position == "learned" and longest > config.block_size:
        raise GptError(f"The splits in {path} have windows of {longest} tokens, more than the model's "
                       f"{config.block_size} learned positions; write splits for a shorter train.seq_len.")
