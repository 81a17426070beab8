"""Attention patterns: which keys each query may attend, as objects the model is given by name.

`[model] attention` (and the model's per-call `attention=`) names one through `registry.ATTENTION`: a
built-in here, a plugin's entry point, "package.module:attr" or "file.py:attr" (docs/extending.md). A
pattern is an AttentionPattern: its name, a one-line description, and `mask(context)`, the boolean mask
(True = may attend) of the queries and keys a MaskContext describes. `causal` marks the one pattern that
scaled_dot_product_attention runs without a mask (its is_causal path); `documents` a pattern that keeps to
the documents packed into a window (the model restarts positions at each and lets no query see another
document); `mask_mod` the same mask as a FlexAttention mask function, for the block masks a GPU runs.
Whether a pattern may be trained with an objective is not a flag of the pattern: `gpt train` proves it on a
small model (leaks.py, docs/attention.md).

Torch-free at import (the mask functions import it when they run), so the schema and `gpt train` can name
and resolve a built-in pattern before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from .config import CAUSAL_PATTERN
from .errors import GptError
from .registry import ATTENTION

if TYPE_CHECKING:
    import torch

# A FlexAttention mask function: (batch, head, query index, key index) → bool (torch.nn.attention.flex_attention).
MaskMod = Callable[[Any, Any, Any, Any], Any]


@dataclass(frozen=True)
class MaskContext:
    """What a pattern's mask may depend on, for one forward pass. A pattern takes the whole context and
    reads what it needs, so fields added later break no pattern that does not read them; every field after
    `config` has a default, so code that builds a context by keyword keeps working.

    queries: (T,) index of each query in the sequence, a KV cache's positions first (so past..past+T-1).
    keys: (S,) index of each key, 0..S-1. config: the model's ModelConfig (sliding_window, block_size, ...).
    documents: (B, S) the document each key belongs to (0, 1, ... counted from the sequence's start, a
    document ending after each end-of-text token, model.eot_id), for a pattern with `documents`; else None.
    draw: the objective's draw for these rows (objectives.py): a mapping of names to tensors (B, ...), e.g.
    "prefix" (B,) for prefix_lm; None when the forward pass is given none (generation, next_token).
    """

    queries: "torch.Tensor"
    keys: "torch.Tensor"
    config: Any
    documents: Optional["torch.Tensor"] = None
    draw: Optional[Mapping[str, "torch.Tensor"]] = None

    @property
    def distance(self) -> "torch.Tensor":
        """(T, S): how far back each key is from each query (0 for itself, negative for a later key)."""
        return self.queries[:, None] - self.keys[None, :]  # (T, S)

    @property
    def same_document(self) -> "torch.Tensor":
        """(B, T, S): True where a query and a key lie in one document (needs `documents`)."""
        if self.documents is None:
            raise GptError("An attention pattern asked for the documents of a window, but its AttentionPattern "
                           "does not set documents=True (docs/attention.md).")
        query_documents = self.documents[:, self.queries]  # (B, T)
        return query_documents[:, :, None] == self.documents[:, None, :]  # (B, T, S)


@dataclass(frozen=True)
class AttentionPattern:
    """A named attention pattern. mask(context) → bool (T, S) or (B, T, S), True where a query may attend
    a key; it must leave each query at least one key, or the model lets that query attend itself.

    documents: the model computes each key's document (MaskContext.documents), restarts positions at 0 in
    each document (learned and rotary alike) and lets no query attend a key of another document, on top of
    `mask`: so a packed window gives each document the logits it gets alone.
    mask_mod(context) → a FlexAttention mask function of (b, h, q, k) equal to `mask`, or None: on CUDA the
    model then runs FlexAttention over a block mask instead of a dense mask (model.py).
    sees_future: informational, for people reading the pattern (some query may attend a later key); what
    `gpt train` refuses is decided by the leak check (leaks.py), not by this flag."""

    name: str
    description: str
    mask: Callable[[MaskContext], "torch.Tensor"]
    causal: bool = False  # exactly causal: the model passes no mask and asks SDPA for is_causal when it can
    sees_future: bool = False
    documents: bool = False
    mask_mod: Optional[Callable[[MaskContext], MaskMod]] = None


def draw_tensor(context: MaskContext, name: str, pattern: str, objective: str) -> "torch.Tensor":
    """The objective's draw `name` (B, ...) a pattern reads, or one sentence saying which objective draws it."""
    if context.draw is None or name not in context.draw:
        raise GptError(f'The attention pattern "{pattern}" reads the "{name}" that train.objective "{objective}" '
                       f'draws for each window, and this forward pass was given none (train with objective '
                       f'"{objective}", or give the model draw={{"{name}": ...}}).')
    return context.draw[name]


# --- the built-ins -----------------------------------------------------------------------------------------


def causal_mask(context: MaskContext) -> "torch.Tensor":
    return context.distance >= 0  # (T, S)


def causal_mod(context: MaskContext) -> MaskMod:
    return lambda b, h, q, k: q >= k


def bidirectional_mask(context: MaskContext) -> "torch.Tensor":
    import torch

    return torch.ones_like(context.distance, dtype=torch.bool)  # (T, S)


def sliding_window_mask(context: MaskContext) -> "torch.Tensor":
    """Causal, and at most `sliding_window` keys including the query itself."""
    distance = context.distance
    return (distance >= 0) & (distance < context.config.sliding_window)  # (T, S)


def sliding_window_mod(context: MaskContext) -> MaskMod:
    window = context.config.sliding_window
    return lambda b, h, q, k: (q >= k) & (q - k < window)


def prefix_mask(context: MaskContext) -> "torch.Tensor":
    """Causal, and the first `prefix` positions of each row (the draw of prefix_lm) see each other: a key
    is seen when it lies in the prefix or not after the query. Without a draw (generation) no prefix: causal."""
    if context.draw is None or "prefix" not in context.draw:
        return causal_mask(context)
    prefix = context.draw["prefix"]  # (B,)
    in_prefix = context.keys[None, :] < prefix[:, None]  # (B, S)
    return (context.distance >= 0)[None] | in_prefix[:, None, :]  # (B, T, S)


def prefix_mod(context: MaskContext) -> MaskMod:
    if context.draw is None or "prefix" not in context.draw:
        return causal_mod(context)
    prefix = context.draw["prefix"]
    return lambda b, h, q, k: (q >= k) | (k < prefix[b])


def conditional_mask(context: MaskContext) -> "torch.Tensor":
    """P(X_e | X_c) laid out as the conditional objective lays out a window (objectives.py): each slot has a
    level (0 for a conditioning token, i for the i-th evaluation token, -1 for padding) and is either a
    token's content or a query for an evaluation token. Content at level 0 sees all content at level 0 (the
    conditioning tokens see each other); any other slot sees the content of lower levels and itself. So the
    i-th evaluation token's query sees X_c and the evaluation tokens before it, and nothing of its own."""
    level = draw_tensor(context, "level", "conditional", "conditional")  # (B, L)
    content = draw_tensor(context, "content", "conditional", "conditional")  # (B, L)
    level_q, level_k = level[:, context.queries, None], level[:, None, context.keys]  # (B, T, 1), (B, 1, S)
    content_q, content_k = content[:, context.queries, None], content[:, None, context.keys]
    conditioning = (level_q == 0) & (level_k == 0) & content_q  # (B, T, S)
    return (content_k & ((level_k < level_q) | conditioning)) | (context.distance == 0)[None]  # (B, T, S)


CAUSAL = AttentionPattern(CAUSAL_PATTERN, "each position attends itself and every earlier one (GPT-1, GPT-2)",
                          causal_mask, causal=True, mask_mod=causal_mod)
BIDIRECTIONAL = AttentionPattern("bidirectional", "every position attends every position (masked_lm's; next_token "
                                 "training refuses it)", bidirectional_mask, sees_future=True)
SLIDING_WINDOW = AttentionPattern("sliding_window", "causal, each position attends itself and the "
                                  "model.sliding_window - 1 positions before it", sliding_window_mask,
                                  mask_mod=sliding_window_mod)
DOCUMENT = AttentionPattern("document", "causal inside each document of a packed window (a document ends after each "
                            "end-of-text token); positions restart at 0 in each", causal_mask, documents=True,
                            mask_mod=causal_mod)
DOCUMENT_SLIDING_WINDOW = AttentionPattern("document_sliding_window", "sliding_window inside each document of a "
                                           "packed window; positions restart at 0 in each", sliding_window_mask,
                                           documents=True, mask_mod=sliding_window_mod)
PREFIX = AttentionPattern("prefix", "prefix_lm's: the drawn prefix of each window sees itself both ways, the rest "
                          "is causal", prefix_mask, sees_future=True, mask_mod=prefix_mod)
CONDITIONAL = AttentionPattern("conditional", "the conditional objective's: X_c both ways, each evaluation token "
                               "X_c and the evaluation tokens before it", conditional_mask, sees_future=True)


def attention_pattern(value: Any, where: str = "model.attention") -> AttentionPattern:
    """The pattern `value` names (a registered name or a reference), or `value` itself when it is one
    already. A reference may also name a plain function of a MaskContext returning the mask: it becomes a
    pattern of that name (its docstring's first line the description). Anything else is one GptError sentence
    naming the registered patterns."""
    if isinstance(value, AttentionPattern):
        return value
    pattern = ATTENTION.resolve(value, where=where)
    if callable(pattern) and not isinstance(pattern, type):
        return pattern_of_function(pattern, value)
    if not isinstance(pattern, AttentionPattern):
        raise GptError(f'{where} = "{value}" names {type(pattern).__name__} {pattern!r:.60}, not an '
                       "AttentionPattern or a mask function (gptcli.attention.AttentionPattern; docs/attention.md).")
    return pattern


def pattern_of_function(function: Callable[[MaskContext], "torch.Tensor"], value: str) -> AttentionPattern:
    """A user's mask function as a pattern named after where it was found (what config.json then records)."""
    description = (function.__doc__ or "").strip().splitlines()
    return AttentionPattern(name=str(value), description=description[0] if description else str(value), mask=function)
