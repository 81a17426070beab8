"""The training data as everything else asks about it: a data source. Training (its loaders), pre-flight (is
there a batch, is there a val split), `gpt eval --split`, a resume (where the loader stood) and the tests'
probes ask a source, never a directory, so another kind of source can stand behind the same questions.

Today's one source is a `gpt prepare` dir (PreparedSource). The next is a weighted mixture of several: it
answers the same questions (its windows, its loaders and what their state_dict saves), and the rules built
on those answers (DataSource's own methods) hold for it unchanged.

A loader a source makes hands out (inputs, targets) micro batches (`next_batch`), the first micro batches of
its rank's share in a fixed order for evaluation (`sequential_batches`), tells observers what it handed out
(`observe`), and saves and restores where it stands (`state_dict`, `load_state_dict`): that state is what a
checkpoint keeps as the client state's "loader", in whatever form the source's loader defines (for one dir:
data/loader.py's cursor, unchanged, so older checkpoints resume).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import numpy as np

from ..batch import BatchLayout
from ..config import DataConfig
from ..errors import GptError
from .loader import BatchLoader, window_count
from .shards import PreparedData, open_prepared


class DataSource(ABC):
    """The questions asked of training data, and the rules built on their answers."""

    description: str  # how messages name the source: a directory, or the sources of a mixture

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """The tokenizer the tokens were made with (tokenizer.Tokenizer.fingerprint)."""

    @abstractmethod
    def check_tokenizer(self, fingerprint: Optional[str], vocab_size: int) -> None:
        """Refuse tokens made with another tokenizer (`fingerprint`; None: not checked), or ids beyond
        `vocab_size`, in one sentence."""

    @abstractmethod
    def tokens(self, split: str) -> int:
        """Tokens in `split` ("train" or "val"); 0 when it has none."""

    @abstractmethod
    def windows(self, split: str, seq_len: int) -> int:
        """Training sequences of seq_len (+1 for the last target) that `split` holds."""

    @abstractmethod
    def loader(self, split: str, micro_batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
               seed: int = 0, shuffle: bool = True, windows_per_step: Optional[int] = None) -> BatchLoader:
        """This rank's loader of `split` (see the module docstring)."""

    @abstractmethod
    def sequences(self, split: str, vocab_size: int, max_tokens: int = 0) -> list[np.ndarray]:
        """`split` as token sequences to score end to end (`gpt eval --split`), at most max_tokens (0: all)
        of them scored; an id beyond `vocab_size` is one sentence."""

    # --- the rules, the same for every source -----------------------------------------------------------------

    def check_train_batch(self, layout: BatchLayout) -> None:
        """The train split must hold one micro batch on every rank."""
        needed = layout.micro_batch_size * layout.world_size
        if self.windows("train", layout.seq_len) < needed:
            raise GptError(f'The "train" split of {self.description} has {self.tokens("train"):,} tokens: fewer '
                           f"than one batch of {layout.micro_batch_size} sequences × {layout.seq_len + 1} tokens on "
                           f"each of {layout.world_size} rank(s); lower train.micro_batch_size or train.seq_len, "
                           "or prepare more text.")

    def evaluation_batch(self, layout: BatchLayout) -> int:
        """Sequences per rank of an evaluation micro batch: the training micro batch, or fewer when the val
        split holds fewer windows than one batch on every rank (evaluate on what there is); 0 when it does
        not hold one window per rank."""
        return min(layout.micro_batch_size, self.windows("val", layout.seq_len) // layout.world_size)

    def train_loader(self, layout: BatchLayout, rank: int, seed: int, shuffle: bool) -> BatchLoader:
        """The train split in the seeded order, one optimizer step's windows at a time."""
        return self.loader("train", layout.micro_batch_size, layout.seq_len, rank=rank, world_size=layout.world_size,
                           seed=seed, shuffle=shuffle, windows_per_step=layout.sequences_per_step)

    def val_loader(self, layout: BatchLayout, rank: int, seed: int) -> Optional[BatchLoader]:
        """The val split in file order, at the evaluation batch; None when it holds no window per rank."""
        batch = self.evaluation_batch(layout)
        if batch == 0:
            return None
        return self.loader("val", batch, layout.seq_len, rank=rank, world_size=layout.world_size, seed=seed,
                           shuffle=False)


class PreparedSource(DataSource):
    """One `gpt prepare` dir: each split one token stream over its shards (data/loader.py)."""

    def __init__(self, data: PreparedData):
        self.data = data
        self.description = str(data.directory)

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    def check_tokenizer(self, fingerprint: Optional[str], vocab_size: int) -> None:
        self.data.check_fits(fingerprint, vocab_size)

    def tokens(self, split: str) -> int:
        return self.data.num_tokens(split)

    def windows(self, split: str, seq_len: int) -> int:
        return window_count(self.tokens(split), seq_len)  # a split is one stream over its shards

    def loader(self, split: str, micro_batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
               seed: int = 0, shuffle: bool = True, windows_per_step: Optional[int] = None) -> BatchLoader:
        return BatchLoader(self.data, split, micro_batch_size, seq_len, rank=rank, world_size=world_size, seed=seed,
                           shuffle=shuffle, windows_per_step=windows_per_step)

    def sequences(self, split: str, vocab_size: int, max_tokens: int = 0) -> list[np.ndarray]:
        """Each shard of `split` one sequence, memory-mapped, cut so that at most max_tokens are scored."""
        sequences, budget = [], max_tokens
        for shard in self.data.splits.get(split, []):
            tokens = shard.tokens
            if max_tokens > 0:
                if budget <= 0:
                    break
                tokens = tokens[: budget + 1]
                budget -= len(tokens) - 1
            if len(tokens) and int(tokens.max()) >= vocab_size:  # the shard changed after it was written
                raise GptError(f"Shard {shard.path} holds token id {int(tokens.max())}, outside the vocabulary of "
                               f"{vocab_size:,}: the shard is corrupt; check it with `gpt prepare --verify`.")
            if len(tokens) >= 2:
                sequences.append(tokens)
        return sequences


def open_source(config: DataConfig) -> DataSource:
    """The project's data source: the prepared dir of [data] dir (its manifest and every shard's header
    checked)."""
    return PreparedSource(open_prepared(config.dir))
