"""The batch of one optimizer step: micro batch × gradient accumulation × ranks, each sequence seq_len
tokens, worked out from [train]'s keys in one place. Loading the project asks it before the number of ranks
is known (and checks what holds for any number of them); the planner, the engine and a resume ask it once
they know the ranks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .errors import GptError


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step is made of sequences."""

    micro_batch_size: int  # sequences per rank per forward pass
    grad_accum_steps: int  # micro batches per rank per optimizer step
    world_size: int  # data-parallel ranks
    seq_len: int  # tokens per sequence

    @property
    def sequences_per_rank(self) -> int:
        """Sequences each rank runs per optimizer step."""
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def sequences_per_step(self) -> int:
        return self.sequences_per_rank * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def in_micro_batches(self, limit: int) -> Optional["BatchLayout"]:
        """The same step in the largest micro batch of at most `limit` sequences that divides each rank's
        share, the accumulation making up the rest; None when `limit` is below one sequence."""
        micro = next((m for m in range(min(limit, self.sequences_per_rank), 0, -1)
                      if self.sequences_per_rank % m == 0), 0)
        if not micro:
            return None
        return dataclasses.replace(self, micro_batch_size=micro, grad_accum_steps=self.sequences_per_rank // micro)


def batch_layout(train, seq_len: int, ranks: Optional[int] = None) -> BatchLayout:
    """micro × accumulation × ranks from `train` (config.TrainConfig): micro_batch_size and grad_accum_steps,
    or, when global_batch_tokens is set, the accumulation that makes that many tokens per step. `ranks`
    None (the project loading, before the ranks are known): only what holds for any number of ranks is
    checked, and the layout is one rank's. A batch that cannot be laid out is one GptError sentence."""
    micro, total = train.micro_batch_size, train.global_batch_tokens
    if not total:
        return BatchLayout(micro, train.grad_accum_steps, ranks or 1, seq_len)
    factors = {"train.micro_batch_size": micro, "seq_len": seq_len, **({"ranks": ranks} if ranks else {})}
    per_micro_step = math.prod(factors.values())
    if total % per_micro_step:
        raise GptError(f"train.global_batch_tokens ({total:,}) is not a multiple of {' × '.join(factors)} = "
                       f"{' × '.join(map(str, factors.values()))} = {per_micro_step:,}.")
    return BatchLayout(micro, total // per_micro_step, ranks or 1, seq_len)
