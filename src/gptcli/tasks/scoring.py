"""Log-likelihoods of continuations, as lm-evaluation-harness's `hf` backend computes them, in fewer model
rows.

Tokens (lm-eval's `_encode_pair`): trailing whitespace of the context moves to the front of the
continuation; the continuation's tokens are those of `encode(context + continuation)` after the first
len(encode(context)) of them, and the model reads encode(context) + those (an empty context is the
end-of-text token alone). A continuation's log-likelihood is the sum of log-softmax at each of its
tokens; it is "greedy" when every one of its tokens is the argmax there.

What is shared is computed once. The inputs of an example's continuations (context + continuation minus
its last token) are merged into a prefix tree of tokens and packed into one row: each token attends to
the tokens on its path from the root only, with the position it has in its own sequence, so every
token's hidden state is the one lm-eval's separate forward pass computes, while the context and any
tokens the continuations start with in common are run once (HellaSwag's four endings share a context
twice their length; PIQA's, ARC's, SciQ's, BoolQ's the question or passage). WinoGrande is the other way
round: its requests differ in the context (each option fills the blank) and share the continuation (the
rest of the sentence). There the tree branches at the option: the sentence before the blank runs once,
and the shared continuation once per option, since each of its hidden states sees the option before it.
Only the rows that predict a continuation token go through the vocabulary projection, once each, where
lm-eval projects and log-softmaxes every position of every request.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import GptError
from .benchmarks import Example, Scored

Request = tuple[list[int], list[int]]  # a context's tokens and a continuation's, as the model reads them


@dataclass
class Group:
    """An example's tokens: per continuation, the context it follows and its own tokens (most examples share
    one context list among all their requests)."""

    example: Example
    requests: list[Request]

    @property
    def continuations(self) -> list[list[int]]:
        return [continuation for _, continuation in self.requests]

    @property
    def positions_needed(self) -> int:
        """Positions the longest request occupies (lm-eval: context + continuation − 1 model inputs)."""
        return max(len(context) + len(continuation) for context, continuation in self.requests) - 1

    @property
    def most_packed(self) -> int:
        """The most tokens its packed row can have: each distinct context once, every continuation."""
        contexts = {tuple(context) for context, _ in self.requests}
        return sum(len(c) for c in contexts) + sum(len(c) for c in self.continuations)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens, for a causal model."""
    context_ids, continuations = encode_continuations(tokenizer, context, [continuation])
    return context_ids, continuations[0]


def encode_continuations(tokenizer, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """encode_pair for several continuations of one context, which is encoded once: with its trailing
    whitespace moved into the continuation, the context's tokens do not depend on the continuation."""
    if not context:
        if tokenizer.eot_id is None:
            raise GptError("the context is empty and the tokenizer has no end-of-text token to stand for it.")
        return [tokenizer.eot_id], [tokenizer.encode(c) for c in continuations]
    context_ids = tokenizer.encode(context.rstrip())
    if not context_ids:
        raise GptError("the context is only whitespace.")
    return context_ids, [tokenizer.encode(context + c)[len(context_ids):] for c in continuations]


def encode_requests(tokenizer, pairs: list[tuple[str, str]]) -> list[Request]:
    """encode_pair of each (context, continuation), each distinct context encoded once (and its token list
    shared by its requests)."""
    encoded: dict[str, tuple[list[int], list[list[int]]]] = {}
    for context in dict.fromkeys(context for context, _ in pairs):
        encoded[context] = encode_continuations(tokenizer, context, [c for ctx, c in pairs if ctx == context])
    taken = {context: iter(continuations) for context, (_, continuations) in encoded.items()}
    return [(encoded[context][0], next(taken[context])) for context, _ in pairs]


def encode_example(tokenizer, example: Example, block_size: int) -> Group:
    """The example's tokens; a continuation without tokens or a request longer than the context is an error."""
    where = example.where or f"example {example.index}"
    try:
        group = Group(example, encode_requests(tokenizer, example.requests()))
    except GptError as error:
        raise GptError(f"{where}: {error}") from None
    if any(not ids for ids in group.continuations):
        raise GptError(f"{where}: a continuation has no tokens of its own after the context.")
    if group.positions_needed > block_size:
        longest = max(group.requests, key=lambda request: len(request[0]) + len(request[1]))
        raise GptError(f"{where} needs {group.positions_needed} positions (context {len(longest[0])} tokens + "
                       f"continuation), more than the model's context of {block_size}.")
    return group


# --- packing ------------------------------------------------------------------------------------------------


@dataclass
class Packed:
    """A group as one row: a prefix tree of tokens, parents before children."""

    tokens: list[int]
    parents: list[int]  # index of each token's parent, -1 for the root
    depths: list[int]  # its position in its own sequence
    rows: list[list[int]]  # per continuation: the packed index whose output predicts each of its tokens


def pack(group: Group) -> Packed:
    """The requests' inputs (context + continuation minus its last token) merged where they start alike: a
    shared context (HellaSwag's four endings), or the sentence before the blank that WinoGrande's two
    contexts share; tokens after the first difference get nodes of their own, as their hidden states differ."""
    packed = Packed([], [], [], [])
    children: dict[tuple[int, int], int] = {}
    for context, continuation in group.requests:
        path, parent = [], -1
        for depth, token in enumerate(context + continuation[:-1]):
            node = children.get((parent, token))
            if node is None:
                node = children[(parent, token)] = len(packed.tokens)
                packed.tokens.append(token)
                packed.parents.append(parent)
                packed.depths.append(depth)
            path.append(node)
            parent = node
        first = len(context) - 1  # the context's last token predicts the continuation's first
        packed.rows.append(path[first:first + len(continuation)])
    return packed


def batch_inputs(packs: list[Packed], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (B, T), positions (B, T) and the tree mask (B, T, T) of a batch of packed rows, padded on
    the right; a token may attend to itself and its ancestors (padding to nothing; the model lets such a
    row attend to itself)."""
    width = max(len(p.tokens) for p in packs)
    tokens = np.zeros((len(packs), width), dtype=np.int64)
    positions = np.zeros((len(packs), width), dtype=np.int64)
    mask = np.zeros((len(packs), width, width), dtype=bool)
    for b, p in enumerate(packs):
        n = len(p.tokens)
        tokens[b, :n], positions[b, :n] = p.tokens, p.depths
        for i, parent in enumerate(p.parents):
            if parent >= 0:
                mask[b, i, :i] = mask[b, parent, :i]  # a parent comes before its child: its row is complete
            mask[b, i, i] = True
    return (torch.from_numpy(tokens).to(device), torch.from_numpy(positions).to(device),
            torch.from_numpy(mask).to(device))


# --- scoring ------------------------------------------------------------------------------------------------


def score_batch(model, packs: list[Packed], groups: list[Group], full_forward: bool = False) -> list[list[Scored]]:
    """One forward pass over a batch of packed groups, one vocabulary projection of the rows that predict."""
    logprobs, row_of = predicting_rows(model, packs, full_forward)
    picks, targets = [], []
    for p, group, rows_of_batch in zip(packs, groups, row_of, strict=True):
        for rows, continuation in zip(p.rows, group.continuations, strict=True):
            picks += [rows_of_batch[row] for row in rows]
            targets += continuation
    pick = torch.tensor(picks, device=logprobs.device)
    target = torch.tensor(targets, device=logprobs.device)
    token_logprobs = logprobs[pick, target].double().tolist()
    token_greedy = (logprobs.argmax(dim=-1)[pick] == target).tolist()
    results, at = [], 0
    for group in groups:
        scored = []
        for continuation in group.continuations:
            end = at + len(continuation)
            scored.append(Scored(sum(token_logprobs[at:end]), all(token_greedy[at:end])))
            at = end
        results.append(scored)
    return results


def predicting_rows(model, packs: list[Packed], full_forward: bool) -> tuple[torch.Tensor, list[dict[int, int]]]:
    """Log-softmax (R, V) in fp32, as lm-eval takes it, at the R packed positions that predict a
    continuation token, and per batch row a map from packed index to its row in that matrix.

    full_forward: call the model itself and project every position, then pick (ZeRO-3 gathers the weights
    in hooks around the model's own forward, the way training calls it); else only the R rows go through
    the vocabulary projection."""
    device = model.wte.weight.device
    tokens, positions, mask = batch_inputs(packs, device)
    width = tokens.size(1)
    wanted = sorted({b * width + row for b, p in enumerate(packs) for rows in p.rows for row in rows})
    index = torch.tensor(wanted, device=device)
    if full_forward:
        logits, _ = model(tokens, attention=mask, position_ids=positions)  # (B, T, V)
        logits = logits.reshape(-1, logits.size(-1))[index]  # (R, V)
    else:
        hidden = model.hidden_states(tokens, attention=mask, position_ids=positions)  # (B, T, C)
        logits = model.head(hidden.reshape(-1, hidden.size(-1))[index])  # (R, V)
    row_of: list[dict[int, int]] = [{} for _ in packs]
    for row, flat in enumerate(wanted):
        row_of[flat // width][flat % width] = row
    return torch.log_softmax(logits.float(), dim=-1), row_of


def score_groups(model, groups: list[Group], batch_size: int, autocast=None,
                 progress: Optional[Callable[[int], None]] = None, min_batches: int = 0,
                 full_forward: bool = False) -> list[list[Scored]]:
    """Scores of every continuation of every group, in the groups' order. Groups of similar packed length
    are batched together (longest first), `batch_size` at a time; `progress(n)` after each batch of n.

    min_batches: run at least this many forward passes (repeating the last batch, results unused), so that
    ranks under ZeRO-3, which gather weights inside every forward, all run the same number; full_forward:
    see score_batch."""
    packs = [pack(g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: -len(packs[i].tokens))
    results: list[Optional[list[Scored]]] = [None] * len(groups)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # no_grad, not inference_mode: under ZeRO-3 the weights this gathers are the training's own tensors.
    with torch.no_grad(), autocast or nullcontext():
        for batch in batches:
            scored_batch = score_batch(model, [packs[i] for i in batch], [groups[i] for i in batch], full_forward)
            for i, scored in zip(batch, scored_batch, strict=True):
                results[i] = scored
            if progress is not None:
                progress(len(batch))
        for _ in range(min_batches - len(batches)):
            filler = batches[-1] if batches else []
            score_batch(model, [packs[i] for i in filler] or [EMPTY_PACK], [groups[i] for i in filler] or [EMPTY_GROUP],
                        full_forward)
    return results  # type: ignore[return-value]


# A stand-in for a rank that has no example left to score but must run a forward pass with the others.
EMPTY_GROUP = Group(Example(-1, "", (" ",), ("",), 0, "filler"), [([0], [0])])
EMPTY_PACK = pack(EMPTY_GROUP)
