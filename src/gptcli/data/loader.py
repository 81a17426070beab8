"""Deterministic, resumable batches over prepared shards.

The shards of a split are read as one stream, in order: `gpt prepare` writes a split as a single token
stream cut into shards of a fixed size, so a document may continue from one shard into the next and a
window may span the cut. Window i covers tokens [i·T, i·T + T + 1) of the stream: inputs are its first T
tokens and targets its last T, so every token but the first is predicted once per epoch and nothing is
skipped but the stream's last (< T) tokens.

Each epoch visits every window once, in a seeded permutation (or in order). The global batch of a micro
step is the next `micro_batch_size × world_size` windows of that order; rank r takes its own contiguous
slice, so ranks never see the same window. An optimizer step takes `windows_per_step` consecutive windows
(its micro steps' global batches, one after the other), and an epoch ends when fewer than one optimizer
step's windows are left (those are skipped). So the windows of each optimizer step depend on the order
and the step's size alone, not on how ranks and accumulation divide it: a run resumed on another number
of ranks, with the accumulation adapted, consumes exactly the windows the original run would have. The
whole position is `(epoch, position)`; the order of an epoch is a pure function of (seed, epoch), so
saving those two numbers restores exactly the batches a run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import GptError
from .shards import PreparedData


@dataclass
class Cursor:
    """Where a loader stands: the epoch, and how many windows of its order have been handed out."""

    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_dict(cls, values: dict) -> "Cursor":
        return cls(epoch=int(values["epoch"]), position=int(values["position"]))


def window_count(tokens: int, seq_len: int) -> int:
    """Windows of a stream of `tokens`: each needs seq_len + 1 tokens, and they start at 0, T, 2T, ..."""
    return max(tokens - 1, 0) // seq_len


class BatchLoader:
    """(B, T+1) windows of one split for one data-parallel rank; `next_batch()` → (inputs, targets)."""

    def __init__(self, data: PreparedData, split: str, micro_batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, windows_per_step: Optional[int] = None):
        self.shards = data.splits.get(split, [])
        self.split, self.batch, self.seq_len = split, micro_batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.vocab_size = data.vocab_size
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)])  # stream position where each shard begins
        self.num_windows = window_count(int(self.shard_starts[-1]), seq_len)
        self.global_batch = micro_batch_size * world_size
        # An optimizer step: micro steps × the global batch of one (gradient accumulation).
        self.windows_per_step = windows_per_step or self.global_batch
        if self.windows_per_step % self.global_batch:
            raise ValueError(f"windows_per_step {self.windows_per_step} is not a multiple of the global batch "
                             f"{self.global_batch}")
        if self.num_windows < self.windows_per_step:
            have = sum(s.num_tokens for s in self.shards)
            raise GptError(f'The "{split}" split of {data.directory} has {have:,} tokens: fewer than one batch of '
                           f"{self.windows_per_step} sequences × {seq_len + 1} tokens over {world_size} rank(s).")
        self.cursor = Cursor()
        self.micro = 0  # micro batches of the current optimizer step handed out so far
        self.observers: list[Callable[[dict], None]] = []
        self._order_epoch: Optional[int] = None
        self._order: Optional[np.ndarray] = None

    @property
    def micro_steps_per_step(self) -> int:
        return self.windows_per_step // self.global_batch

    @property
    def batches_per_epoch(self) -> int:
        """Micro batches per epoch (this rank's share of each)."""
        return self.num_windows // self.windows_per_step * self.micro_steps_per_step

    def order(self, epoch: int) -> np.ndarray:
        """The window visiting order of `epoch`: a permutation seeded by (seed, epoch), or 0..N-1."""
        if self._order is None or self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._order = rng.permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def window(self, index: int) -> np.ndarray:
        """Window `index` → its T+1 token ids, read from as many shards as it spans."""
        start = index * self.seq_len
        end = start + self.seq_len + 1
        shard = self._shard_at(start)
        pieces = []
        while start < end:
            offset = start - int(self.shard_starts[shard])
            piece = self.shards[shard].tokens[offset: offset + end - start]
            pieces.append(piece)
            start += len(piece)
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _shard_at(self, position: int) -> int:
        return int(np.searchsorted(self.shard_starts, position, side="right")) - 1

    def _batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)  # (B, T+1)
        if windows.size and int(windows.max()) >= self.vocab_size:  # a shard changed after it was checked
            row, column = np.unravel_index(int(np.argmax(windows)), windows.shape)
            shard = self.shards[self._shard_at(int(indices[row]) * self.seq_len + int(column))].path
            raise GptError(f"Shard {shard} holds token id {int(windows.max())}, outside the vocabulary of "
                           f"{self.vocab_size:,}: the shard is corrupt; check it with `gpt prepare --verify`.")
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def next_windows(self) -> np.ndarray:
        """This rank's next micro batch of window indices; advances the cursor by one global batch. The
        first micro batch of an optimizer step starts the next epoch when this one has fewer windows left
        than a step takes, so a step never mixes epochs however ranks and accumulation divide it."""
        if self.micro == 0 and self.cursor.position + self.windows_per_step > self.num_windows:
            self.cursor = Cursor(epoch=self.cursor.epoch + 1, position=0)
        begin = self.cursor.position + self.rank * self.batch
        chosen = self.order(self.cursor.epoch)[begin: begin + self.batch]
        self.cursor = Cursor(self.cursor.epoch, self.cursor.position + self.global_batch)
        self.micro = (self.micro + 1) % self.micro_steps_per_step
        for observer in self.observers:
            observer({"epoch": self.cursor.epoch, "windows": [int(i) for i in chosen]})
        return chosen

    def observe(self, observer: Callable[[dict], None]) -> None:
        """Call `observer` with {"epoch", "windows"} for every micro batch of window indices handed out."""
        self.observers.append(observer)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, T), targets (B, T)) as int64 CPU tensors."""
        return self._batch(self.next_windows())

    def state_dict(self) -> dict:
        where = self.locate(self.cursor)
        return {**self.cursor.to_dict(), **where, "micro": self.micro, "seed": self.seed, "shuffle": self.shuffle,
                "num_windows": self.num_windows, "global_batch": self.global_batch,
                "windows_per_step": self.windows_per_step}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved cursor. The data must be the same (its windows and their order); the batch
        layout may differ (another number of ranks, another accumulation): the cursor is a place in the
        order, and the next optimizer step takes the windows that follow it."""
        for key in ("num_windows", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise GptError(f"Cannot resume the data order: {key} was {state[key]} in the checkpoint but is "
                               f"{getattr(self, key)} now (the shards or seq_len changed).")
        if state.get("micro", 0) and state.get("windows_per_step") != self.windows_per_step:
            raise GptError("Cannot resume the data order in the middle of an optimizer step with another batch "
                           "layout.")
        self.cursor = Cursor.from_dict(state)
        self.micro = int(state.get("micro", 0))

    def locate(self, cursor: Cursor) -> dict:
        """The shard and token offset of the next window this rank reads (for people reading the cursor)."""
        position = cursor.position + self.rank * self.batch
        if position >= self.num_windows:
            return {"shard": None, "offset": None}
        start = int(self.order(cursor.epoch)[position]) * self.seq_len
        shard = self._shard_at(start)
        return {"shard": self.shards[shard].path.name, "offset": start - int(self.shard_starts[shard])}

    def sequential_batches(self, count: int):
        """The first `count` micro batches of this rank's slice in file order (evaluation: always the same)."""
        per_rank = self.num_windows // self.world_size
        mine = np.arange(self.rank * per_rank, (self.rank + 1) * per_rank)
        for b in range(min(count, len(mine) // self.batch)):
            yield self._batch(mine[b * self.batch: (b + 1) * self.batch])
