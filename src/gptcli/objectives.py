"""Training objectives: what the model learns to predict from a window of tokens, as one object each.
`train.objective` names one through `registry.OBJECTIVES` (docs/attention.md, docs/extending.md).

An objective turns the windows the loader hands out, (B, N) token ids (N = seq_len + 1), into a Batch:
    the slots the model runs     `inputs` (B, L) with their `positions` and which slots show no token
                                 (`hidden_tokens`: the token embedding is left out, only the position enters)
    which slots count            `targets`, -100 where nothing is predicted
    what the pattern reads       `draw`, name → tensor (B, ...): the prefix of prefix_lm, the levels of
                                 conditional (attention.py's patterns read them from MaskContext.draw)
    what must stay hidden        `order` (B, N): the token at window position j may be predicted only from
                                 tokens of a lower order; `sources` and `target_index` say which window token
                                 each slot shows and predicts. The leak check (leaks.py) proves with autograd
                                 that the model under the project's pattern keeps to it.

Each window's draw is a pure function of (project seed, the window's key): the key is (0, epoch, window
index) in training, so a resumed run, or one on another number of ranks, draws exactly what the first did,
and no draw is saved in a checkpoint.

Torch-free at import, like optimizers.py: the schema checks `[train] objective_options` against a spec
without torch; `prepare` imports it when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .errors import GptError
from .optimizers import Option
from .registry import OBJECTIVES

# A window's key streams: training windows, the val windows of an evaluation during training, gpt eval's.
TRAIN_STREAM, VAL_STREAM, EVAL_STREAM = 0, 1, 2


@dataclass
class Batch:
    """One micro batch as an objective lays it out (see the module doc). Tensors on one device; every
    optional field None means the plain layout: positions 0..L-1, every token shown, slot s shows window
    token s and predicts window token s + 1, order = window position."""

    inputs: Any  # (B, L) int64
    targets: Any  # (B, L) int64, -100 where nothing is counted
    positions: Any = None  # (B, L) int64
    hidden_tokens: Any = None  # (B, L) bool
    draw: Optional[dict] = None  # name → (B, ...) tensor
    order: Any = None  # (B, N) int64
    sources: Any = None  # (B, L) int64, -1 where a slot shows no token
    target_index: Any = None  # (B, L) int64, -1 where a slot predicts nothing

    def model_inputs(self) -> dict:
        """The keyword arguments of GPT.forward this batch sets (none for next_token)."""
        given = {"position_ids": self.positions, "hidden_tokens": self.hidden_tokens, "draw": self.draw}
        return {key: value for key, value in given.items() if value is not None}

    def to(self, device) -> "Batch":
        def move(value):
            if value is None:
                return None
            if isinstance(value, dict):
                return {key: tensor.to(device) for key, tensor in value.items()}
            return value.to(device)

        return Batch(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})


# prepare(windows (B, N) int64 tensor, keys (B, K) int64 array, seed, options) → Batch
Prepare = Callable[[Any, np.ndarray, int, Mapping[str, Any]], Batch]


@dataclass(frozen=True)
class Objective:
    """A training objective as gptcli knows it (the module doc says what each part is for).

    pattern: the attention pattern it is meant for (the leak check's advice, the examples); draws: whether
    its batches depend on a seeded draw per window; options: its keys in `[train] objective_options`."""

    name: str
    description: str
    pattern: str
    prepare: Prepare
    options: Mapping[str, Option] = field(default_factory=dict)
    draws: bool = False

    def option_values(self, given: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """Its options with `given` (`[train] objective_options`) over their defaults."""
        checked = self.check_options(given or {})
        return {key: checked.get(key, option.default) for key, option in self.options.items()}

    def check_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """One sentence for an unknown key (with the nearest), a wrong type or a value out of range; then the
        objective's own rule between its options (`check_values`)."""
        import difflib

        checked = {}
        for key, value in given.items():
            where = f"train.objective_options.{key}"
            if key not in self.options:
                known = ", ".join(self.options) or "none"
                close = difflib.get_close_matches(key, list(self.options), n=1, cutoff=0.5)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise GptError(f'{where} is not an option of the objective "{self.name}" (its options: {known}){hint}.')
            checked[key] = self.options[key].check(where, value)
        values = {key: checked.get(key, option.default) for key, option in self.options.items()}
        for low, high in (("min_prefix_fraction", "max_prefix_fraction"),
                          ("min_condition_fraction", "max_condition_fraction")):
            if low in values and high in values and values[low] > values[high]:
                raise GptError(f"train.objective_options.{low} ({values[low]}) must not exceed "
                               f"train.objective_options.{high} ({values[high]}).")
        return checked

    def batch(self, windows, keys: np.ndarray, seed: int, options: Optional[Mapping[str, Any]] = None) -> Batch:
        """`prepare` with the options filled in (windows (B, N) on any device; the draws are made on the CPU
        and moved to the windows' device)."""
        return self.prepare(windows, np.asarray(keys, dtype=np.int64), seed, self.option_values(options))


def objective_spec(value: str, where: str = "train.objective") -> Objective:
    """The objective `value` names (a registered name or a reference: registry.OBJECTIVES), or one sentence."""
    spec = OBJECTIVES.resolve(value, where=where)
    if not isinstance(spec, Objective):
        raise GptError(f'{where} = "{value}" names {type(spec).__name__} {spec!r:.60}, not an Objective '
                       "(gptcli.objectives.Objective; docs/extending.md).")
    return spec


def window_rng(seed: int, key) -> np.random.Generator:
    """The generator of one window's draw: PCG64 seeded by (seed, *key), independent of every other window."""
    return np.random.Generator(np.random.PCG64([int(seed), *(int(k) for k in key)]))


def keys_for(stream: int, first: int, count: int, *rest: int) -> np.ndarray:
    """(count, 2 + len(rest)) keys (stream, *rest, index) for windows first..first + count - 1."""
    index = np.arange(first, first + count, dtype=np.int64)
    columns = [np.full(count, stream, dtype=np.int64), *(np.full(count, r, dtype=np.int64) for r in rest), index]
    return np.stack(columns, axis=1)


def as_tensor(array: np.ndarray, like):
    """A numpy draw → a tensor on `like`'s device."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(like.device)


# --- next_token ------------------------------------------------------------------------------------------------


def next_token_batch(windows, keys: np.ndarray, seed: int, options: Mapping[str, Any]) -> Batch:
    """Each position predicts the token after it: inputs are a window's first N-1 tokens, targets its last."""
    return Batch(inputs=windows[:, :-1], targets=windows[:, 1:])


NEXT_TOKEN = Objective(name="next_token", description="each position predicts the next token (GPT-1, GPT-2)",
                       pattern="causal", prepare=next_token_batch)


# --- prefix_lm -------------------------------------------------------------------------------------------------


def prefix_length(rng: np.random.Generator, length: int, options: Mapping[str, Any]) -> int:
    """A prefix of [ceil(min·T), floor(max·T)] tokens, uniformly, at least 1 and at most T - 1."""
    low = min(max(1, math.ceil(options["min_prefix_fraction"] * length)), length - 1)
    high = min(max(low, math.floor(options["max_prefix_fraction"] * length)), length - 1)
    return int(rng.integers(low, high + 1))


def prefix_lm_batch(windows, keys: np.ndarray, seed: int, options: Mapping[str, Any]) -> Batch:
    """Next-token targets on the suffix only: the tokens after each window's drawn prefix, predicted from
    positions that (under the "prefix" pattern) see the whole prefix both ways and the suffix causally."""
    import torch

    length = windows.size(1) - 1
    prefixes = np.array([prefix_length(window_rng(seed, key), length, options) for key in keys], dtype=np.int64)
    targets = windows[:, 1:].clone()
    prefix = as_tensor(prefixes, windows)  # (B,)
    predicts = torch.arange(1, length + 1, device=windows.device)[None, :]  # (1, T): the token each slot predicts
    targets[predicts < prefix[:, None]] = -100  # a prefix token is seen, not predicted
    return Batch(inputs=windows[:, :-1], targets=targets, draw={"prefix": prefix})


PREFIX_LM = Objective(
    name="prefix_lm", pattern="prefix", draws=True, prepare=prefix_lm_batch,
    description="a drawn prefix of each window is seen both ways; the tokens after it are predicted one by one",
    options={"min_prefix_fraction": Option(0.1, "Shortest prefix, as a fraction of the window.", at_least=0, at_most=1),
             "max_prefix_fraction": Option(0.9, "Longest prefix, as a fraction of the window.", at_least=0, at_most=1)})


# --- masked_lm -------------------------------------------------------------------------------------------------


def masked_lm_batch(windows, keys: np.ndarray, seed: int, options: Mapping[str, Any]) -> Batch:
    """A drawn share of each window's tokens is hidden (shown as a position without a token) and predicted
    in place from the others. Every hidden token is hidden: BERT's habit of showing 10% of them unchanged
    would let a position see its own target, which the leak check refuses."""
    length = windows.size(1) - 1
    count = min(length, max(1, round(options["mask_fraction"] * length)))
    hidden = np.zeros((len(keys), length), dtype=bool)
    for row, key in enumerate(keys):
        hidden[row, window_rng(seed, key).choice(length, size=count, replace=False)] = True
    inputs = windows[:, :-1]
    hidden_tokens = as_tensor(hidden, windows)  # (B, T)
    targets = inputs.masked_fill(~hidden_tokens, -100)
    positions = np.arange(length, dtype=np.int64)[None]
    order = np.concatenate([hidden, np.zeros((len(keys), 1), dtype=bool)], axis=1).astype(np.int64)  # (B, N)
    return Batch(inputs=inputs, targets=targets, hidden_tokens=hidden_tokens, order=as_tensor(order, windows),
                 sources=as_tensor(np.where(hidden, -1, positions), windows),
                 target_index=as_tensor(np.where(hidden, positions, -1), windows))


MASKED_LM = Objective(
    name="masked_lm", pattern="bidirectional", draws=True, prepare=masked_lm_batch,
    description="a drawn share of each window is hidden and predicted from everything else (BERT's masked LM)",
    options={"mask_fraction": Option(0.15, "Share of each window's tokens hidden and predicted (BERT: 0.15).",
                                     above=0, at_most=1)})


# --- conditional -----------------------------------------------------------------------------------------------


def conditional_window(length: int, min_condition_fraction: float) -> int:
    """Tokens n of a window the conditional layout covers in `length` slots: its n content slots and one query
    slot per evaluation token, of which there are at most n - ceil(min_condition_fraction · n)."""
    n = length
    while n > 1 and n + n - math.ceil(min_condition_fraction * n) > length:
        n -= 1
    return n


def draw_condition(rng: np.random.Generator, n: int, options: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(X_c sorted, X_e in evaluation order) over positions 0..n-1: the conditioned share uniform in
    [min, max] of n, at least one token evaluated; X_e in sequence order, or shuffled with random_order."""
    fraction = rng.uniform(options["min_condition_fraction"], options["max_condition_fraction"])
    low = math.ceil(options["min_condition_fraction"] * n)
    conditioned = min(max(low, round(fraction * n)), n - 1)
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.choice(n, size=conditioned, replace=False)] = True
    evaluate = np.flatnonzero(~chosen)
    if options["random_order"]:
        evaluate = rng.permutation(evaluate)
    return np.flatnonzero(chosen), evaluate


def conditional_layout(condition: np.ndarray, evaluate: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """One window's slots (each array (length,), positions indexing the window): X_c's content, X_e's content
    in evaluation order, then one query per evaluation token (no token shown, at the position it predicts),
    then padding. `level` and `content` are what the "conditional" pattern reads (attention.py)."""
    k, m = len(condition), len(evaluate)
    if k + 2 * m > length:
        raise GptError(f"A conditional window of {k} conditioning and {m} evaluation tokens needs {k + 2 * m} "
                       f"positions; the model runs {length}.")
    slots = {"source": np.full(length, -1), "target": np.full(length, -1), "position": np.zeros(length, np.int64),
             "level": np.full(length, -1), "content": np.zeros(length, bool)}
    ranks = np.arange(1, m + 1)
    shown = np.concatenate([condition, evaluate])
    slots["source"][:k + m] = shown
    slots["position"][:k + m] = shown
    slots["content"][:k + m] = True
    slots["level"][:k + m] = np.concatenate([np.zeros(k, np.int64), ranks])
    slots["target"][k + m:k + 2 * m] = evaluate
    slots["position"][k + m:k + 2 * m] = evaluate
    slots["level"][k + m:k + 2 * m] = ranks
    return slots


def conditional_slots(windows, splits: list[tuple[np.ndarray, np.ndarray]], length: int) -> Batch:
    """The batch of windows (B, N) laid out for the given (X_c, X_e) of each row (training's draws, or a
    splits file's sets: evaluate.py), over `length` slots."""
    import torch

    rows = [conditional_layout(condition, evaluate, length) for condition, evaluate in splits]
    stacked = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    order = np.full((len(splits), windows.size(1)), -1, dtype=np.int64)
    for row, (condition, evaluate) in enumerate(splits):
        order[row, condition] = 0
        order[row, evaluate] = np.arange(1, len(evaluate) + 1)
    sources = as_tensor(stacked["source"], windows)
    target_index = as_tensor(stacked["target"], windows)
    inputs = torch.gather(windows, 1, sources.clamp(min=0)).masked_fill(sources < 0, 0)  # (B, L)
    targets = torch.gather(windows, 1, target_index.clamp(min=0)).masked_fill(target_index < 0, -100)  # (B, L)
    return Batch(inputs=inputs, targets=targets, positions=as_tensor(stacked["position"], windows),
                 hidden_tokens=sources < 0, order=as_tensor(order, windows), sources=sources, target_index=target_index,
                 draw={"level": as_tensor(stacked["level"], windows), "content": as_tensor(stacked["content"], windows)})


def conditional_batch(windows, keys: np.ndarray, seed: int, options: Mapping[str, Any]) -> Batch:
    """Each window's first n tokens split into X_c and X_e by the documented draw (draw_condition), laid out
    in the window's seq_len slots (conditional_layout)."""
    length = windows.size(1) - 1
    n = conditional_window(length, options["min_condition_fraction"])
    splits = [draw_condition(window_rng(seed, key), n, options) for key in keys]
    return conditional_slots(windows, splits, length)


CONDITIONAL = Objective(
    name="conditional", pattern="conditional", draws=True, prepare=conditional_batch,
    description="P(X_e | X_c): a drawn conditioning set seen both ways, the rest predicted in order from it",
    options={"min_condition_fraction": Option(0.25, "Smallest share of a window conditioned on.", at_least=0, below=1),
             "max_condition_fraction": Option(0.75, "Largest share of a window conditioned on.", at_least=0, below=1),
             "random_order": Option(False, "Predict X_e in a random order (σ-GPT's) instead of left to right.")})

