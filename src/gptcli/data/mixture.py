"""A weighted mixture of prepared dirs (`[[data.sources]]`): which source each training window comes from,
the mixture's loader, and the position a checkpoint keeps.

The schedule. The weights become integers a_i with sum D (0.7/0.3 → 7 and 3, D = 10; weights that are no
ratio of small numbers are rounded to parts of MAX_PERIOD). Window n of the run (n = 0, 1, ...; all ranks
count the same global windows) comes from the source that Tijdeman's rule for the chairman assignment
problem picks at slot n + 1: among the sources at least δ = 1/(2k−2) windows behind their share, the one
that would soonest fall 1 − δ behind (R. Tijdeman, "The chairman assignment problem", Discrete Math. 32,
1980). So after every prefix of n windows each source i has given within 1 − 1/(2k−2) windows of a_i/D · n:
within one window, at every step, whatever the number of ranks or the accumulation, since the windows of
an optimizer step are the next S of the run as they are for one dir (data/loader.py). With integer shares
the slots of one period (D windows) hold exactly a_i windows of source i, so the schedule repeats with
period D: it is computed once, for one period, and window n's source and its place in that source's
stream are two table look-ups.

Each source is read as its own stream: its k-th window is window `order(k // N)[k % N]` of its train
split (N windows), `order(epoch)` a permutation seeded by (project seed, source name, epoch), so each
source keeps its own shuffled order and epochs (a source's epoch ends wherever it ends; steps mix sources
anyway). The loader's position is the number of windows of the run handed out; with the schedule it gives
every source's count (`taken`).

A resume whose mixture changed (data.allow_mixture_change) starts a new segment: the schedule counts from
the checkpoint's position again, with the new weights, and each source kept (by name) continues its own
stream where it stood (its `base`); the segments are the state's "history".
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import GptError
from .loader import BatchLoader

# The longest period of the schedule: weights that are no ratio of small numbers are rounded to parts of it, so
# each share is within 1/65,536 of the weight's (largest remainder; a tiny weight gets at least one part).
MAX_PERIOD = 1 << 16
# Windows whose sources and places the loader works out at once (a few hundred µs of numpy per block).
LOOKUP_BLOCK = 4096
STATE_KIND = "mixture"  # a mixture loader's state says so; a one-dir loader's state has no "kind"


def integer_shares(weights: list[float]) -> list[int]:
    """Weights as integers with the smallest sum D that keeps them exact (weights as written: 0.7 is 7/10, not
    its binary neighbour); when D would exceed MAX_PERIOD, rounded to parts of MAX_PERIOD (largest remainder),
    each at least 1."""
    exact = [Fraction(repr(float(w))) for w in weights]
    shares = [w / sum(exact) for w in exact]
    period = reduce(math.lcm, (s.denominator for s in shares), 1)
    if period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    raw = [s * MAX_PERIOD for s in shares]
    parts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in by_remainder[: MAX_PERIOD - sum(parts)]:
        parts[i] += 1
    for i, part in enumerate(parts):
        if part == 0:  # a tiny weight still gives a window per period
            parts[i] = 1
            parts[parts.index(max(parts))] -= 1
    divisor = reduce(math.gcd, parts)
    return [part // divisor for part in parts]


def tijdeman_period(shares: list[int]) -> np.ndarray:
    """The source of each slot of one period (sum(shares) slots), by Tijdeman's rule in exact integer
    arithmetic. Job j of source i (its j-th window) is released at slot (j + δ)·D/a_i and due at
    (j + 1 − δ)·D/a_i; each slot takes the released job due first (ties: the lower source index)."""
    k, period = len(shares), sum(shares)
    if k == 1:
        return np.zeros(period, dtype=np.int64)
    m = 2 * k - 2  # δ = 1/m
    common = reduce(math.lcm, shares, 1)  # due times compare as ((j + 1)·m − 1)/a_i: scaled to integers by it

    def release(i: int, j: int) -> int:
        """The first slot s with s ≥ (j + δ)·D/a_i."""
        return -(-(j * m + 1) * period // (shares[i] * m))

    def due(i: int, j: int) -> int:
        return ((j + 1) * m - 1) * (common // shares[i])

    taken = [0] * k
    waiting = [(release(i, 0), i) for i in range(k)]  # (release slot, source) of jobs not released yet
    heapq.heapify(waiting)
    ready: list[tuple[int, int]] = []  # (due, source) of released jobs
    slots = np.empty(period, dtype=np.int64)
    for slot in range(1, period + 1):
        while waiting and waiting[0][0] <= slot:
            i = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (due(i, taken[i]), i))
        assert ready, "Tijdeman's rule always has a released job"
        i = heapq.heappop(ready)[1]
        slots[slot - 1] = i
        taken[i] += 1
        heapq.heappush(waiting, (release(i, taken[i]), i))
    assert taken == shares, "one period holds exactly each source's share"
    return slots


class Schedule:
    """Which source each window of a segment comes from, and how many each has given before it."""

    def __init__(self, shares: list[int]):
        self.shares = np.asarray(shares, dtype=np.int64)  # a_i: source i gives a_i of every D windows
        self.slots = tijdeman_period(list(shares))  # the source of each slot of a period
        onehot = np.eye(len(shares), dtype=np.int64)[self.slots]  # (D, k)
        zero = np.zeros((1, len(shares)), dtype=np.int64)
        self.before = np.vstack([zero, np.cumsum(onehot, axis=0)])  # (D+1, k): windows of each source in slots [0, p)
        self.rank_in_source = self.before[np.arange(len(self.slots)), self.slots]  # slot p's place in its source

    @property
    def period(self) -> int:
        return len(self.slots)

    @property
    def weights(self) -> list[float]:
        """The shares the schedule keeps, normalised."""
        return [int(a) / self.period for a in self.shares]

    def sources_of(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's stream counted from the segment's start) of each window number."""
        cycles, slot = np.divmod(windows, self.period)
        sources = self.slots[slot]
        return sources, cycles * self.shares[sources] + self.rank_in_source[slot]

    def counts(self, windows: int) -> np.ndarray:
        """Windows each source has given in the first `windows` windows of the segment."""
        cycles, slot = divmod(windows, self.period)
        return cycles * self.shares + self.before[slot]


def source_seed(seed: int, name: str) -> int:
    """A source's own order seed: the project seed and its name, so that renaming one source or adding
    another leaves the others' orders as they were."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@dataclass
class Part:
    """One source of a mixture as its loader reads it."""

    name: str
    stream: BatchLoader  # its split as one stream of windows: window(i), order(epoch)
    identity: dict  # what a resume compares: name, share, windows, the data's digest


class MixtureLoader:
    """(B, T+1) windows of a mixture for one data-parallel rank; the same interface as BatchLoader."""

    def __init__(self, parts: list[Part], schedule: Schedule, micro_batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 windows_per_step: Optional[int] = None):
        self.parts, self.schedule = parts, schedule
        self.batch, self.seq_len, self.rank, self.world_size = micro_batch_size, seq_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch_size * world_size
        self.windows_per_step = windows_per_step or self.global_batch
        if self.windows_per_step % self.global_batch:
            raise ValueError(f"windows_per_step {self.windows_per_step} is not a multiple of the global batch "
                             f"{self.global_batch}")
        self.vocab_size = min(part.stream.vocab_size for part in parts)
        self._micro_steps = self.windows_per_step // self.global_batch
        self.position = 0  # windows of the segment handed out (all ranks)
        self.micro = 0
        self.base = np.zeros(len(parts), dtype=np.int64)  # each source's windows given before the segment
        self._base, self._shares = self.base.tolist(), schedule.shares.tolist()  # the same, as Python ints
        self.names = [part.name for part in parts]
        self.history: list[dict] = [{"step": 0, "sources": self.identities()}]
        self.observers: list[Callable[[dict], None]] = []
        self._block_start = 0
        self._block_sources: list[int] = []  # see lookup
        self._block_windows: list[int] = []

    @property
    def micro_steps_per_step(self) -> int:
        return self.windows_per_step // self.global_batch

    def identities(self) -> list[dict]:
        return [part.identity for part in self.parts]

    def taken(self) -> dict[str, int]:
        """Windows each source has given so far (earlier segments included). Plain Python over one row of the
        schedule's table: the read-ahead thread asks after every batch."""
        cycles, slot = divmod(self.position, self.schedule.period)
        given = self.schedule.before[slot].tolist()
        return {name: base + cycles * share + count for name, base, share, count
                in zip(self.names, self._base, self._shares, given, strict=True)}

    def lookup(self, begin: int, count: int) -> tuple[list[int], list[int]]:
        """(source, window index in its split) of windows [begin, begin + count) of the segment, from a block
        of LOOKUP_BLOCK windows worked out at once (numpy over the block, not Python per window) and kept as
        Python lists (a micro batch is then two list slices)."""
        at = begin - self._block_start
        if at < 0 or at + count > len(self._block_sources):
            sources, windows = self.windows_of(np.arange(begin, begin + max(count, LOOKUP_BLOCK)))
            self._block_start, self._block_sources, self._block_windows = begin, sources.tolist(), windows.tolist()
            at = 0
        return self._block_sources[at: at + count], self._block_windows[at: at + count]

    def windows_of(self, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, window index in its split) of each window number of the segment: its place in its source's
        stream (base + the schedule's count) read through that source's order of the epoch it falls in."""
        sources, places = self.schedule.sources_of(numbers)
        places = places + self.base[sources]
        windows = np.empty_like(places)
        for source in np.unique(sources).tolist():
            mine = sources == source
            stream = self.parts[source].stream
            epochs, offsets = np.divmod(places[mine], stream.num_windows)
            picked = np.empty_like(offsets)
            for epoch in np.unique(epochs).tolist():
                same = epochs == epoch
                picked[same] = stream.order(epoch)[offsets[same]]
            windows[mine] = picked
        return sources, windows

    def next_windows(self) -> list[tuple[int, int]]:
        """This rank's next micro batch as (source, window index in its split) pairs; advances one global batch."""
        first = self.position + self.rank * self.batch
        sources, windows = self.lookup(first, self.batch)
        chosen = list(zip(sources, windows, strict=True))
        self.position += self.global_batch
        self.micro = (self.micro + 1) % self._micro_steps
        for observer in self.observers:
            observer({"sources": [self.names[s] for s, _ in chosen], "windows": [w for _, w in chosen],
                      "numbers": list(range(first, first + self.batch))})
        return chosen

    def observe(self, observer: Callable[[dict], None]) -> None:
        """Call `observer` with {"sources", "windows", "numbers"} for every micro batch handed out (numbers: each
        window's place in the mixture's schedule, as objectives' draws are keyed)."""
        self.observers.append(observer)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, T), targets (B, T)) as int64 CPU tensors."""
        chosen = self.next_windows()
        windows = np.stack([self.parts[s].stream.window(w) for s, w in chosen]).astype(np.int64)  # (B, T+1)
        if windows.size and int(windows.max()) >= self.vocab_size:  # a shard changed after it was checked
            row = int(np.argmax(windows.max(axis=1)))
            part = self.parts[chosen[row][0]]
            raise GptError(f'A shard of data.sources "{part.name}" ({part.stream.shards[0].path.parent}) holds token '
                           f"id {int(windows.max())}, outside the vocabulary of {self.vocab_size:,}: it is corrupt; "
                           "check it with `gpt prepare --verify`.")
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        """Where it stands (the read-ahead thread asks after every batch: the lists in it are shared, not copied;
        nothing changes them in place)."""
        return {"kind": STATE_KIND, "position": self.position, "micro": self.micro, "seed": self.seed,
                "shuffle": self.shuffle, "global_batch": self.global_batch, "windows_per_step": self.windows_per_step,
                "sources": self.history[-1]["sources"], "base": dict(zip(self.names, self._base, strict=True)),
                "taken": self.taken(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position of the same mixture (mixture.resume_state translates a changed one); the
        batch layout may differ, between optimizer steps."""
        if state.get("kind") != STATE_KIND:
            raise GptError("Cannot resume the data order: the checkpoint was trained on one data dir, not this "
                           "mixture.")
        for key in ("seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise GptError(f"Cannot resume the data order: {key} was {state[key]} in the checkpoint but is "
                               f"{getattr(self, key)} now.")
        if state["sources"] != self.identities():
            raise GptError("Cannot resume the data order: the checkpoint's [[data.sources]] differ from these.")
        if state.get("micro", 0) and state.get("windows_per_step") != self.windows_per_step:
            raise GptError("Cannot resume the data order in the middle of an optimizer step with another batch "
                           "layout.")
        self.position, self.micro = int(state["position"]), int(state.get("micro", 0))
        self.base = np.array([int(state["base"][name]) for name in self.names], dtype=np.int64)
        self._base = self.base.tolist()
        self._block_sources = []  # worked out with the old base
        self.history = list(state["history"])


def changed_state(saved: dict, loader_identities: list[dict], step: int) -> dict:
    """The state that continues a checkpoint's `saved` loader state with another mixture (`loader_identities`)
    from `step`: a new segment at position 0; each source the two share by name continues its stream where it
    stood; the history gains the new segment."""
    if saved.get("micro", 0):
        raise GptError("Cannot change the mixture in the middle of an optimizer step; resume from a checkpoint "
                       "saved at the end of one.")
    taken = saved.get("taken", {}) if saved.get("kind") == STATE_KIND else {}
    history = saved.get("history", [{"step": 0, "sources": "one data dir"}]) if saved.get("kind") == STATE_KIND \
        else [{"step": 0, "sources": "one data dir"}]
    return {"kind": STATE_KIND, "position": 0, "micro": 0, "seed": saved.get("seed"), "shuffle": saved.get("shuffle"),
            "windows_per_step": saved.get("windows_per_step"), "sources": loader_identities,
            "base": {entry["name"]: int(taken.get(entry["name"], 0)) for entry in loader_identities},
            "history": [*history, {"step": step, "sources": loader_identities}]}


def mixture_difference(saved: dict, now: list[dict]) -> str:
    """How the mixture of a checkpoint's loader state differs from `now` (identities), in words."""
    if saved.get("kind") != STATE_KIND:
        return "one data dir, now a mixture"
    before = {entry["name"]: entry for entry in saved["sources"]}
    after = {entry["name"]: entry for entry in now}
    changes = [f'"{name}" removed' for name in before if name not in after]
    changes += [f'"{name}" added' for name in after if name not in before]
    kept = [name for name in after if name in before]
    weights = [f"{name} {share_of(before[name]):.3f} → {share_of(after[name]):.3f}" for name in kept
               if share_of(before[name]) != share_of(after[name])]
    changes += [f"weights {', '.join(weights)}"] if weights else []
    changes += [f'"{name}"\'s data changed' for name in kept if before[name]["digest"] != after[name]["digest"]]
    changes += [f'"{name}" cut into {after[name]["windows"]:,} windows, not {before[name]["windows"]:,} '
                "(train.seq_len changed?)" for name in kept
                if before[name]["digest"] == after[name]["digest"] and before[name]["windows"] != after[name]["windows"]]
    if not changes and [e["name"] for e in saved["sources"]] != [e["name"] for e in now]:
        changes.append("the sources' order")
    return "; ".join(changes) or "its sources"


def share_of(identity: dict) -> float:
    return identity["share"] / identity["period"]
