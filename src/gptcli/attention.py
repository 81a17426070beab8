"""Attention patterns: which keys each query may attend, as objects the model is given by name.

`[model] attention` (and the model's per-call `attention=`) names one through `registry.ATTENTION`: a
built-in here, a plugin's entry point, "package.module:attr" or "file.py:attr" (docs/extending.md). A
pattern is an AttentionPattern: its name, a one-line description, and `mask(context)`, the boolean mask
(True = may attend) of the queries and keys a MaskContext describes; `causal` marks the one pattern that
scaled_dot_product_attention runs without a mask (its is_causal path), `sees_future` a pattern in which a
query may attend a later key (next-token training refuses it: train/command.check_trainable).

Torch-free at import (the mask functions import it when they run), so `gpt train` can ask a built-in
pattern whether it sees the future before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .config import CAUSAL_PATTERN
from .errors import GptError
from .registry import ATTENTION

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MaskContext:
    """What a pattern's mask may depend on, for one forward pass. A pattern takes the whole context and
    reads what it needs, so fields added later (the documents packed into a row, an objective's draw) break
    no pattern that does not read them.

    queries: (T,) index of each query in the sequence, a KV cache's positions first (so past..past+T-1).
    keys: (S,) index of each key, 0..S-1. config: the model's ModelConfig (sliding_window, block_size, ...).
    """

    queries: "torch.Tensor"
    keys: "torch.Tensor"
    config: Any

    @property
    def distance(self) -> "torch.Tensor":
        """(T, S): how far back each key is from each query (0 for itself, negative for a later key)."""
        return self.queries[:, None] - self.keys[None, :]  # (T, S)


@dataclass(frozen=True)
class AttentionPattern:
    """A named attention pattern. mask(context) → bool (T, S) or (B, T, S), True where a query may attend
    a key; it must leave each query at least one key, or the model lets that query attend itself."""

    name: str
    description: str
    mask: Callable[[MaskContext], "torch.Tensor"]
    causal: bool = False  # exactly causal: the model passes no mask and asks SDPA for is_causal when it can
    sees_future: bool = False  # some query may attend a later key


def causal_mask(context: MaskContext) -> "torch.Tensor":
    return context.distance >= 0  # (T, S)


def bidirectional_mask(context: MaskContext) -> "torch.Tensor":
    import torch

    return torch.ones_like(context.distance, dtype=torch.bool)  # (T, S)


def sliding_window_mask(context: MaskContext) -> "torch.Tensor":
    """Causal, and at most `sliding_window` keys including the query itself."""
    distance = context.distance
    return (distance >= 0) & (distance < context.config.sliding_window)  # (T, S)


CAUSAL = AttentionPattern(CAUSAL_PATTERN, "each position attends itself and every earlier one (GPT-1, GPT-2)",
                          causal_mask, causal=True)
BIDIRECTIONAL = AttentionPattern("bidirectional", "every position attends every position (not for next-token "
                                 "training)", bidirectional_mask, sees_future=True)
SLIDING_WINDOW = AttentionPattern("sliding_window", "causal, each position attends itself and the "
                                  "model.sliding_window - 1 positions before it", sliding_window_mask)


def attention_pattern(value: Any, where: str = "model.attention") -> AttentionPattern:
    """The pattern `value` names (a registered name or a reference), or `value` itself when it is one
    already; anything else is one GptError sentence naming the registered patterns."""
    if isinstance(value, AttentionPattern):
        return value
    pattern = ATTENTION.resolve(value, where=where)
    if not isinstance(pattern, AttentionPattern):
        raise GptError(f'{where} = "{value}" names {type(pattern).__name__} {pattern!r:.60}, not an '
                       "AttentionPattern (gptcli.attention.AttentionPattern; docs/extending.md).")
    return pattern
