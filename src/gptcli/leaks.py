"""The leak check: before a run starts, prove with autograd that the attention pattern and the objective fit.

An objective says which tokens each prediction must not depend on (objectives.Batch: the token at window
position j may be predicted only from tokens of a lower `order`; next_token's order is the position itself, so
a prediction may not depend on its target or anything after it). The check builds a small random model of
the project's architecture and pattern (float64, at most CHECK_LAYERS blocks: a leak through a chain of k
positions needs k layers to show), lays out a few random windows as the objective does (its own draws,
documents packed in them), and asks autograd, for each counted slot, which window tokens its prediction has
a gradient for. Masked attention and hidden tokens give gradients of exactly zero, so any non-zero gradient
towards a hidden token is a leak: the first one found is reported as one sentence naming the objective, the
pattern, the (query, key) pair and what to change.

This replaces refusing patterns by name: `bidirectional` with next_token is refused because position 0's
prediction depends on token 1, and a plugin's pattern that lets one query see one later key is refused the
same way. It runs on the CPU in well under a second (one forward and one backward pass over the windows repeated
once per slot).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .attention import AttentionPattern, attention_pattern
from .config import ModelConfig, Project
from .errors import GptError
from .model import GPT, build_model
from .objectives import TRAIN_STREAM, Batch, Objective, keys_for, objective_spec

CHECK_POSITIONS = 48  # slots of each checked window (fewer when the run's seq_len is shorter)
CHECK_ROWS = 3  # windows, each with its own draw
CHECK_LAYERS = 4
CHECK_VOCABULARY = 64  # token ids of the random windows; the last is the end-of-text token when the model has one
END_OF_TEXT_SHARE = 0.15  # of the random tokens, so that windows hold several documents


@dataclass(frozen=True)
class Leak:
    """A counted prediction with a gradient towards a token the objective hides from it (window positions)."""

    query: int  # the position of the slot that predicts
    target: int  # the window position of the token it predicts
    key: int  # the window position of the hidden token it depends on


def check_model_config(config: ModelConfig, layers: int) -> ModelConfig:
    """The project's model, small: same positions, norms, pattern keys (sliding_window), a tiny width, and only
    the positions a checked window uses (a model of a billion positions is refused by the memory check, not
    built here)."""
    ends_documents = config.eot_id < config.vocab_size
    return dataclasses.replace(config, preset=None, n_layer=layers, n_head=2, n_embd=16,
                               vocab_size=CHECK_VOCABULARY, vocab_multiple=1, dropout=0.0, attention="causal",
                               eot_id=CHECK_VOCABULARY - 1 if ends_documents else CHECK_VOCABULARY,
                               block_size=CHECK_POSITIONS + 1)


def random_windows(rows: int, length: int, eot_id: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, length) random token ids, a share of them end-of-text tokens (when eot_id is a token)."""
    tokens = torch.randint(0, CHECK_VOCABULARY - 1, (rows, length), generator=generator)
    ends = torch.rand(rows, length, generator=generator) < END_OF_TEXT_SHARE
    return tokens.masked_fill(ends & (eot_id < CHECK_VOCABULARY), eot_id)


def find_leak(objective: Objective, pattern: AttentionPattern, config: ModelConfig, seq_len: int,
              options: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Optional[Leak]:
    """The first leak of `objective` under `pattern` on a small model like `config`, or None (module doc).
    One block first: there a prediction depends only on the keys its query sees, so a leak found names the
    pair the pattern lets through; then the model's depth (up to CHECK_LAYERS), for leaks through chains."""
    for layers in sorted({1, min(config.n_layer, CHECK_LAYERS)}):
        leak = find_leak_in(objective, pattern, check_model_config(config, layers), seq_len, options, seed)
        if leak is not None:
            return leak
    return None


def find_leak_in(objective: Objective, pattern: AttentionPattern, small: ModelConfig, seq_len: int,
                 options: Optional[Mapping[str, Any]], seed: int) -> Optional[Leak]:
    generator = torch.Generator().manual_seed(seed)
    torch_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    # Tensors this small gain nothing from threads, and on a busy machine their hand-offs cost seconds.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = build_model(small).double().eval()
        length = min(seq_len, CHECK_POSITIONS)
        windows = random_windows(CHECK_ROWS, length + 1, small.eot_id, generator)
        batch = objective.batch(windows, keys_for(TRAIN_STREAM, 0, CHECK_ROWS, 0), seed, options)
        return first_leak(model, pattern, windows, batch, generator)
    finally:
        torch.random.set_rng_state(torch_state)  # the caller's generator and threads are left as they were
        torch.set_num_threads(threads)


def first_leak(model: GPT, pattern: AttentionPattern, windows: torch.Tensor, batch: Batch,
               generator: torch.Generator) -> Optional[Leak]:
    """Run the batch with each slot's token embedding taken from one leaf per window token, and read the
    gradient of every counted prediction towards every window token. Rows are independent, so the batch is
    repeated once per slot and one backward pass gives all of them: copy s holds the gradient of slot s."""
    B, L = batch.inputs.shape
    sources = batch.sources if batch.sources is not None else torch.arange(L).expand(B, L)
    targets = batch.target_index if batch.target_index is not None else torch.arange(1, L + 1).expand(B, L)
    order = batch.order if batch.order is not None else torch.arange(windows.size(1)).expand(B, -1)
    copies = repeated(batch, L)  # row s·B + b is row b, read at slot s
    leaf = model.wte(windows.repeat(L, 1)).detach().requires_grad_()  # (L·B, N, C): one embedding per window token
    index = sources.repeat(L, 1).clamp(min=0)[..., None].expand(-1, -1, leaf.size(-1))  # (L·B, L, C)
    shown = leaf.gather(1, index) * (sources.repeat(L, 1) >= 0)[..., None]  # (L·B, L, C)
    hook = model.wte.register_forward_hook(lambda module, inputs, output: shown)
    try:
        logits, _ = model(copies.inputs, attention=pattern, **copies.model_inputs())  # (L·B, L, V)
    finally:
        hook.remove()
    counted = batch.targets != -100  # (B, L)
    scores = logits @ torch.randn(logits.size(-1), dtype=logits.dtype, generator=generator)  # (L·B, L)
    slot_of_row = torch.arange(L).repeat_interleave(B)  # (L·B,)
    own = scores.gather(1, slot_of_row[:, None])  # (L·B, 1): each copy's score at its own slot
    (gradient,) = torch.autograd.grad(own.sum(), leaf)  # (L·B, N, C)
    depends = (gradient.abs().sum(-1) != 0).view(L, B, -1)  # (L, B, N): slot, row, window token
    target_order = order.gather(1, targets.clamp(min=0)).T[..., None]  # (L, B, 1)
    hidden = (order[None] >= target_order) & counted.T[..., None]  # (L, B, N)
    leaking = (depends & hidden).nonzero()
    if not len(leaking):
        return None
    slot, row, key = (int(v) for v in leaking[0])
    query = int(batch.positions[row, slot]) if batch.positions is not None else slot
    return Leak(query=query, target=int(targets[row, slot]), key=key)


def repeated(batch: Batch, times: int) -> Batch:
    """The batch's rows repeated `times` times (torch's repeat on the batch axis), draws included."""
    def repeat(value):
        if value is None:
            return None
        if isinstance(value, dict):
            return {name: repeat(tensor) for name, tensor in value.items()}
        return value.repeat(times, *([1] * (value.dim() - 1)))

    return Batch(**{name: repeat(getattr(batch, name)) for name in batch.__dataclass_fields__})


def check_fit(project: Project) -> None:
    """Refuse, in one sentence, a project whose attention pattern lets a prediction see what its objective
    hides from it (train/command.py calls this before anything starts)."""
    objective = objective_spec(project.train.objective)
    pattern = attention_pattern(project.model.attention)
    leak = find_leak(objective, pattern, project.model, project.seq_len, project.train.objective_options,
                     seed=project.project.seed)
    if leak is None:
        return
    seen = "its own target" if leak.key == leak.target else "a token the objective hides from it"
    raise GptError(f'train.objective "{objective.name}" does not fit model.attention "{project.model.attention}": '
                   f"the prediction at position {leak.query} of the token at position {leak.target} depends on the "
                   f"token at position {leak.key}, {seen}; use a pattern in which no query sees what the objective "
                   f'hides ("{objective.pattern}" fits {objective.name}), or another objective.')
