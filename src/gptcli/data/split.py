"""The train/val split of `gpt prepare`: seeded, by block, the same whatever the workers or the machine.

Every document is cut, for this purpose only, into blocks of `block_tokens` tokens counted from its start
(its end-of-text token included, where it stands); a document shorter than a block is one block. Block k
of document d (d counts documents in corpus order from 0) goes to val when

    splitmix64(key + (seed + 1)·0x9E3779B97F4A7C15) / 2⁶⁴ < val_fraction,   key = d + k·2⁴⁰

so block 0 of a document is drawn exactly as a whole document was before blocks existed, and a one-file
corpus of many blocks gets val blocks spread through it. Tokens are never reordered: each split receives
its tokens in corpus order, and train + val together hold every token of the corpus.

When the draw leaves val empty although val_fraction > 0, the corpus's last `block_tokens` tokens go to
val instead, provided the corpus holds at least two blocks' worth (the report names the rule that
applied). To allow that, train's last `block_tokens` tokens are held back until the end.
"""

from __future__ import annotations

import numpy as np

BLOCK_KEY_SHIFT = 40  # documents are numbered below 2**40; the block number goes above
_MASK64 = (1 << 64) - 1


def validation_mask(keys: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """True where a unit (a document's block, see the module docstring) goes to val."""
    if val_fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    z = keys.astype(np.uint64) + np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    # splitmix64's finalizer (Steele, Lea & Flood 2014); uint64 arithmetic wraps modulo 2**64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


class Splitter:
    """Splits tokens, task by task in corpus order, into the train and val streams."""

    def __init__(self, seed: int, val_fraction: float, block_tokens: int):
        self.seed, self.val_fraction, self.block_tokens = seed, val_fraction, block_tokens
        self.next_document = 0  # documents begun so far
        self.open_tokens = 0  # tokens of the open document (it continues in the next task) so far
        self.open = False
        self.blocks = self.val_blocks = 0
        self.train_tokens = self.val_tokens = 0
        self.tail = np.zeros(0, dtype=np.int64)  # train's last tokens, held back (see the module docstring)
        self.tail_starts = np.zeros(0, dtype=np.int64)  # positions in `tail` where a document begins
        self.rule = "none" if val_fraction <= 0 else "draw"
        self.moved_documents = 0

    @property
    def held(self) -> int:
        return len(self.tail)

    def split(self, tokens: np.ndarray, counts: np.ndarray, last_open: bool):
        """(train tokens, val tokens, for each document begun here whether it begins in val) of one task;
        `counts` are tokens per document, the first possibly continuing the open one."""
        first = self.next_document - 1 if self.open else self.next_document
        documents = first + np.arange(len(counts), dtype=np.int64)
        offsets = np.zeros(len(counts), dtype=np.int64)  # where each entry starts inside its document
        if self.open:
            offsets[0] = self.open_tokens
        begun = offsets == 0
        val_ranges = self._draw(documents, offsets, counts)
        begins_in_val = validation_mask(documents[begun], self.seed, self.val_fraction)
        self.next_document = first + len(counts)
        self.open = last_open
        self.open_tokens = int(offsets[-1] + counts[-1]) if last_open else 0
        if val_ranges is None:
            return self._hold_back(tokens, counts, begun), tokens[:0], begins_in_val
        low, high = val_ranges
        val = np.concatenate([tokens[a:b] for a, b in zip(low, high, strict=True)])
        train = np.concatenate([tokens[a:b] for a, b in zip([0, *high], [*low, len(tokens)], strict=True)])
        self.val_tokens += len(val)
        return self._hold_back(train, counts, begun, val_ranges), val, begins_in_val

    def _draw(self, documents: np.ndarray, offsets: np.ndarray, counts: np.ndarray):
        """(starts, ends) of the token ranges that go to val, in order and apart (None: none does)."""
        block = self.block_tokens
        ends = offsets + counts
        if int(ends.max(initial=0)) <= block:  # every entry lies in its document's first block
            unit_val = validation_mask(documents, self.seed, self.val_fraction)
            self._count_blocks(offsets == 0, unit_val)
            return _ranges(unit_val, counts)
        first_block = offsets // block
        per_entry = np.where(counts > 0, (ends - 1) // block - first_block + 1, 0)
        entry = np.repeat(np.arange(len(counts)), per_entry)
        number = first_block[entry] + np.arange(len(entry)) - np.repeat(np.cumsum(per_entry) - per_entry, per_entry)
        low = np.maximum(offsets[entry], number * block)
        high = np.minimum(ends[entry], (number + 1) * block)
        unit_val = validation_mask(documents[entry] | (number << BLOCK_KEY_SHIFT), self.seed, self.val_fraction)
        self._count_blocks(low == number * block, unit_val)
        return _ranges(unit_val, high - low)

    def _count_blocks(self, begun: np.ndarray, unit_val: np.ndarray) -> None:
        self.blocks += int(np.count_nonzero(begun))
        self.val_blocks += int(np.count_nonzero(begun & unit_val))

    def _hold_back(self, train: np.ndarray, counts: np.ndarray, begun: np.ndarray, val_ranges=None) -> np.ndarray:
        """Train tokens ready to write: all but the last `block_tokens` seen so far (when val may need them)."""
        self.train_tokens += len(train)
        if self.val_fraction <= 0:
            return train
        starts = (np.cumsum(counts) - counts)[begun & (counts > 0)]  # where documents begin among this task's tokens
        if val_ranges is not None:  # keep those beginning in train, at their place among the train tokens
            low, high = val_ranges
            before = np.searchsorted(low, starts, side="right")  # val ranges starting at or before each
            in_val = (before > 0) & (starts < high[before - 1])
            val_before = np.concatenate([[0], np.cumsum(high - low)])  # val tokens in the first k ranges
            starts = starts[~in_val] - val_before[before[~in_val]]
        held, tail = len(self.tail), self.tail.astype(train.dtype, copy=False)
        keep = max(held + len(train) - self.block_tokens, 0)  # tokens ready, counted from the tail's start
        if keep <= held:
            ready, self.tail = tail[:keep], np.concatenate([tail[keep:], train])
        else:
            ready, self.tail = np.concatenate([tail, train[:keep - held]]), train[keep - held:]
        starts = np.concatenate([self.tail_starts, starts + held])
        self.tail_starts = starts[starts >= keep] - keep
        return ready

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) tokens held back; the tail goes to val when the draw gave val nothing."""
        tail, self.tail = self.tail, self.tail[:0]
        if self.rule == "draw" and self.val_tokens == 0:
            if self.train_tokens >= 2 * self.block_tokens:
                self.rule = "last block"
                self.moved_documents = len(self.tail_starts)
                self.val_tokens, self.train_tokens = len(tail), self.train_tokens - len(tail)
                return tail[:0], tail
            self.rule = "too small"
        return tail, tail[:0]

    def report(self) -> dict:
        return {"by": "block", "block_tokens": self.block_tokens, "rule": self.rule, "blocks": self.blocks,
                "val_blocks": self.val_blocks + (self.rule == "last block")}

    def warnings(self) -> list[str]:
        """Only for a split that failed: the "last block" rule is the expected outcome for a short corpus."""
        if self.rule == "too small":
            return [f"No val split: the seeded draw picked none of the {self.blocks:,} blocks, and the corpus's "
                    f"{self.train_tokens:,} tokens are fewer than two blocks of {self.block_tokens:,} "
                    "(see [data] val_block_tokens)."]
        return []


def _ranges(unit_val: np.ndarray, lengths: np.ndarray):
    """(starts, ends) of the runs of val units, whose token counts are `lengths`, laid end to end; None
    when no unit goes to val."""
    chosen = np.flatnonzero(unit_val)
    if not len(chosen):
        return None
    ends = np.cumsum(lengths)
    low, high = (ends - lengths)[chosen], ends[chosen]
    apart = np.flatnonzero(low[1:] != high[:-1]) + 1  # where a run of adjacent val units ends
    return low[np.r_[0, apart]], high[np.r_[apart - 1, len(high) - 1]]
