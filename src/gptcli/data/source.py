"""The training data as everything else asks about it: a data source. Training (its loaders), pre-flight (is
there a batch, is there a val split), `gpt eval --split`, a resume (where the loader stood) and the tests'
probes ask a source, never a directory, so another kind of source can stand behind the same questions.

Two kinds stand behind them: a `gpt prepare` dir (PreparedSource, `[data] dir`) and a weighted mixture of
several (MixtureSource, `[[data.sources]]`; its schedule and loader are data/mixture.py). A mixture answers
the same questions (its windows, its loaders and what their state_dict saves) and a few more: its
`components` (each source measured on its own: eval_loss/<name>, a row of `gpt eval`), what pre-flight says
and refuses about a run over it (`run_lines`), and how a checkpoint saved with another mixture continues, or
is refused (`resume_state`).

A loader a source makes hands out (inputs, targets) micro batches (`next_batch`), tells observers what it
handed out (`observe`), and saves and restores where it stands (`state_dict`, `load_state_dict`): that state
is what a checkpoint keeps as the client state's "loader", in whatever form the source's loader defines (for
one dir: data/loader.py's cursor, unchanged, so older checkpoints resume). Evaluation reads prepared dirs
only, each in its own file order (`evaluated_parts`, then a dir's `val_loader` and its `sequential_batches`):
one for one dir, one per source of a mixture, which has no one order to evaluate in.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..batch import BatchLayout
from ..config import DataConfig, SourceEntry
from ..errors import GptError
from .loader import BatchLoader, window_count
from .mixture import (
    STATE_KIND,
    MixtureLoader,
    Part,
    Schedule,
    changed_state,
    integer_shares,
    mixture_difference,
    source_seed,
)
from .shards import PreparedData, open_prepared

# What a data source's loader is: one dir's, or a mixture's (the same interface).
Loader = Union[BatchLoader, MixtureLoader]


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
               seed: int = 0, shuffle: bool = True, windows_per_step: Optional[int] = None) -> Loader:
        """This rank's loader of `split` (see the module docstring)."""

    @abstractmethod
    def sequences(self, split: str, vocab_size: int, max_tokens: int = 0) -> list[np.ndarray]:
        """`split` as token sequences to score end to end (`gpt eval --split`), at most max_tokens (0: all)
        of them scored; an id beyond `vocab_size` is one sentence."""

    @property
    @abstractmethod
    def directories(self) -> list[Path]:
        """The prepared dirs it reads (what a run dir must never replace)."""

    def components(self) -> dict[str, "DataSource"]:
        """The sources measured one by one, by name (a mixture's: eval_loss/<name>); empty for one source."""
        return {name: part for name, part in self.evaluated_parts().items() if name}

    @abstractmethod
    def evaluated_parts(self) -> dict[str, "PreparedSource"]:
        """The prepared dirs evaluation reads one by one, each in its own file order, by name: "" for one dir,
        a mixture's sources by theirs (a mixture has no one order to evaluate in)."""

    def run_lines(self, layout: BatchLayout, steps: int, saved: Optional[dict], step: int) -> list[str]:
        """Pre-flight's lines about a run of `steps` more optimizer steps over this data (from checkpoint
        loader state `saved` at `step`, None for a fresh run), after refusing in one sentence what it cannot
        train; none for one dir."""
        return []

    def resume_state(self, saved: dict, step: int, seq_len: int) -> tuple[dict, Optional[str]]:
        """The loader state that continues a checkpoint's (`saved`, its client state's "loader", saved at
        `step`) on this data cut into windows of `seq_len`, and a note to print when the data changed; a change it may not continue is
        one sentence."""
        if saved.get("kind") == STATE_KIND:
            raise GptError(f"The checkpoint at step {step:,} was trained on a mixture of "
                           f"{', '.join(entry['name'] for entry in saved['sources'])}, but the project reads one "
                           f"data dir ({self.description}): set its [[data.sources]] back (one dir is a mixture of "
                           "one source, which data.allow_mixture_change = true can continue), or pass --restart to "
                           "start over.")
        return saved, None

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

    def train_loader(self, layout: BatchLayout, rank: int, seed: int, shuffle: bool) -> Loader:
        """The train split in the seeded order, one optimizer step's windows at a time."""
        return self.loader("train", layout.micro_batch_size, layout.seq_len, rank=rank, world_size=layout.world_size,
                           seed=seed, shuffle=shuffle, windows_per_step=layout.sequences_per_step)

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

    @property
    def directories(self) -> list[Path]:
        return [self.data.directory]

    def tokens(self, split: str) -> int:
        return self.data.num_tokens(split)

    def windows(self, split: str, seq_len: int) -> int:
        return window_count(self.tokens(split), seq_len)  # a split is one stream over its shards

    def loader(self, split: str, micro_batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
               seed: int = 0, shuffle: bool = True, windows_per_step: Optional[int] = None) -> BatchLoader:
        return BatchLoader(self.data, split, micro_batch_size, seq_len, rank=rank, world_size=world_size, seed=seed,
                           shuffle=shuffle, windows_per_step=windows_per_step)

    def val_loader(self, layout: BatchLayout, rank: int, seed: int) -> Optional[BatchLoader]:
        """The val split in file order, at the evaluation batch; None when it holds no window per rank."""
        batch = self.evaluation_batch(layout)
        if batch == 0:
            return None
        return self.loader("val", batch, layout.seq_len, rank=rank, world_size=layout.world_size, seed=seed,
                           shuffle=False)

    def evaluated_parts(self) -> dict[str, "PreparedSource"]:
        return {"": self}

    def data_stream(self, split: str, seq_len: int, seed: int, shuffle: bool) -> BatchLoader:
        """`split` as one stream of windows in a seeded order (a mixture's source: BatchLoader.window, .order)."""
        return BatchLoader(self.data, split, 1, seq_len, seed=seed, shuffle=shuffle)

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


class MixtureSource(DataSource):
    """`[[data.sources]]`: prepared dirs, each giving its share of the training windows (data/mixture.py)."""

    def __init__(self, entries: list[SourceEntry], sources: list[PreparedSource], config: DataConfig):
        self.entries, self.sources, self.config = entries, sources, config
        self.description = "the mixture of " + ", ".join(f"{e.name} ({e.dir})" for e in entries)
        self.shares = integer_shares([entry.weight for entry in entries])
        self._schedule: Optional[Schedule] = None
        first = sources[0]
        for entry, source in zip(entries[1:], sources[1:], strict=True):
            if source.fingerprint != first.fingerprint:
                raise GptError(f'data.sources "{entry.name}" ({entry.dir}) was made with tokenizer {source.fingerprint} '
                               f'but "{entries[0].name}" ({entries[0].dir}) with {first.fingerprint}; prepare every '
                               "source with the same [data] tokenizer.")

    @property
    def schedule(self) -> Schedule:
        """Built on first use (one period of it: up to a few tenths of a second for 8 uneven weights)."""
        if self._schedule is None:
            self._schedule = Schedule(self.shares)
        return self._schedule

    @property
    def weights(self) -> list[float]:
        """The normalised shares the schedule keeps."""
        return [share / sum(self.shares) for share in self.shares]

    @property
    def fingerprint(self) -> str:
        return self.sources[0].fingerprint

    @property
    def directories(self) -> list[Path]:
        return [directory for source in self.sources for directory in source.directories]

    def evaluated_parts(self) -> dict[str, "PreparedSource"]:
        return {entry.name: source for entry, source in zip(self.entries, self.sources, strict=True)}

    def check_tokenizer(self, fingerprint: Optional[str], vocab_size: int) -> None:
        for source in self.sources:
            source.check_tokenizer(fingerprint, vocab_size)

    def tokens(self, split: str) -> int:
        return sum(source.tokens(split) for source in self.sources)

    def windows(self, split: str, seq_len: int) -> int:
        return sum(source.windows(split, seq_len) for source in self.sources)

    def identities(self, seq_len: int) -> list[dict]:
        """What a resume compares, source by source: its name, share of the period, windows, and a digest of
        its train shards (the manifest's sha256 of each)."""
        period = sum(self.shares)
        return [{"name": entry.name, "share": share, "period": period, "windows": source.windows("train", seq_len),
                 "digest": train_digest(source)}
                for entry, source, share in zip(self.entries, self.sources, self.shares, strict=True)]

    def loader(self, split: str, micro_batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
               seed: int = 0, shuffle: bool = True, windows_per_step: Optional[int] = None) -> Loader:
        parts = [Part(identity["name"], source.data_stream(split, seq_len, source_seed(seed, identity["name"]), shuffle),
                      identity) for source, identity in zip(self.sources, self.identities(seq_len), strict=True)]
        return MixtureLoader(parts, self.schedule, micro_batch_size, seq_len, rank=rank, world_size=world_size,
                             seed=seed, shuffle=shuffle, windows_per_step=windows_per_step)

    def sequences(self, split: str, vocab_size: int, max_tokens: int = 0) -> list[np.ndarray]:
        return [s for source in self.sources for s in source.sequences(split, vocab_size, max_tokens)]

    def check_train_batch(self, layout: BatchLayout) -> None:
        """Every source must hold one training window (an empty source gives nothing to its share)."""
        for entry, source in zip(self.entries, self.sources, strict=True):
            if source.windows("train", layout.seq_len) == 0:
                raise GptError(f'data.sources "{entry.name}" ({entry.dir}) has {source.tokens("train"):,} train tokens: '
                               f"not one sequence of {layout.seq_len + 1} tokens; prepare more text for it, or leave "
                               "it out of [[data.sources]].")

    def run_lines(self, layout: BatchLayout, steps: int, saved: Optional[dict], step: int) -> list[str]:
        """A row per source (train tokens, weight, tokens it gives over the whole run, the epochs that makes);
        a source the run would repeat more than data.max_epochs times is refused."""
        position = int(saved["position"]) if saved is not None else 0
        base = np.array([int(saved["base"][e.name]) if saved is not None else 0 for e in self.entries], dtype=np.int64)
        given = base + self.schedule.counts(position + steps * layout.sequences_per_step)
        windows = [source.windows("train", layout.seq_len) for source in self.sources]
        for entry, count, have, weight in zip(self.entries, given.tolist(), windows, self.weights, strict=True):
            if count > self.config.max_epochs * have:
                raise GptError(f'data.sources "{entry.name}" ({entry.dir}) would be repeated {count / have:.1f} times '
                               f"over this run ({count:,} windows of its {have:,}, at weight {weight:.3f}), more than "
                               f"data.max_epochs = {self.config.max_epochs:g}: lower its weight, give it more data, "
                               "shorten the run, or raise data.max_epochs.")
        width = max(len("source"), *(len(e.name) for e in self.entries))
        lines = [f"  data: a mixture of {len(self.entries)} sources (data.max_epochs = {self.config.max_epochs:g})",
                 f"    {'source':<{width}}  {'train tokens':>14}  {'weight':>6}  {'tokens over the run':>19}  {'epochs':>6}"]
        for entry, source, count, have, weight in zip(self.entries, self.sources, given.tolist(), windows,
                                                      self.weights, strict=True):
            lines.append(f"    {entry.name:<{width}}  {source.tokens('train'):>14,}  {weight:>6.3f}  "
                         f"{count * layout.seq_len:>19,}  {count / have:>6.2f}")
        return lines

    def resume_state(self, saved: dict, step: int, seq_len: int) -> tuple[dict, Optional[str]]:
        now = self.identities(seq_len)
        if saved.get("kind") == STATE_KIND and saved["sources"] == now:
            return saved, None
        change = mixture_difference(saved, now)
        if not self.config.allow_mixture_change:
            raise GptError(f"The checkpoint at step {step:,} was trained on another mixture ({change}): set "
                           "[[data.sources]] back, set data.allow_mixture_change = true to continue with this one "
                           "from here (RUN/mixture.json records the change), or pass --restart to start over.")
        return changed_state(saved, now, step), (f"note: the mixture changed at step {step:,} ({change}); continuing "
                                                 "with this one (data.allow_mixture_change), recorded in RUN/mixture.json.")


def train_digest(source: PreparedSource) -> str:
    """The train shards of a prepared dir, by the sha256 its manifest records for each."""
    digests = "".join(shard.sha256 for shard in source.data.splits.get("train", []))
    return hashlib.sha256(digests.encode()).hexdigest()[:16]


def open_source(config: DataConfig) -> DataSource:
    """The project's data source: the mixture of [[data.sources]] when there are any, else the prepared dir
    of [data] dir (each manifest and every shard's header checked)."""
    if not config.sources:
        return PreparedSource(open_prepared(config.dir))
    sources = [PreparedSource(open_prepared(entry.dir)) for entry in config.sources]
    return MixtureSource(list(config.sources), sources, config)
