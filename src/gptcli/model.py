"""GPT-1 and GPT-2 in one model, chosen by configuration.

GPT-2 (Radford et al. 2019): pre-LN blocks and a final LayerNorm `ln_f`.
GPT-1 (Radford et al. 2018): post-LN blocks (LayerNorm after each residual add) and no `ln_f`.
Parameter names are GPT-2's (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, ...), so Hugging Face weights map
onto this model by name plus a documented list of transposes (see hf/convert.py).

Shapes: B batch, T query positions, S key positions (T plus what a KV cache holds), H heads,
D head dimension, C = n_embd, V vocabulary.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttentionPattern, MaskContext, attention_pattern
from .config import ModelConfig
from .errors import GptError

# --- embeddings -----------------------------------------------------------------------------------------


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for RoPE (Su et al. 2021) at integer `positions` (B, T) → each (B, 1, T, D/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, D/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head vector of x (B, H, T, D)."""
    first, second = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)


# --- documents ----------------------------------------------------------------------------------------------


class DocumentCarry:
    """The documents of what a KV cache holds, as the next positions continue them (each (B,))."""

    def __init__(self, next_document: torch.Tensor, starts: torch.Tensor, base: torch.Tensor):
        self.next_document, self.starts, self.base = next_document, starts, base


def document_layout(idx: torch.Tensor, positions: torch.Tensor, eot_id: int,
                    carry: Optional[DocumentCarry] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documents packed in token ids idx (B, T): a document ends after each end-of-text token.

    positions: (B, T) each token's position in the row (a cache's first). Returns (documents (B, T): 0, 1, ...
    from the row's start, or carried on from the cache; ends (B, T): the end-of-text tokens; bases (B, T): the
    position each token's document starts at; positions (B, T) restarted at 0 in each document)."""
    B, T = idx.shape
    ends = idx == eot_id  # (B, T)
    if carry is None:
        carry = DocumentCarry(idx.new_zeros(B), torch.ones(B, dtype=torch.bool, device=idx.device), positions[:, 0])
    counted = torch.cumsum(ends.long(), dim=1)  # (B, T): end-of-text tokens up to and including each
    documents = carry.next_document[:, None] + counted - ends.long()  # (B, T)
    starts = torch.cat([carry.starts[:, None], ends[:, :-1]], dim=1)  # (B, T): the first token of a document
    columns = torch.arange(T, device=idx.device).expand(B, T)
    last_start = torch.cummax(torch.where(starts, columns, -1), dim=1).values  # (B, T), -1: begun in the cache
    bases = torch.where(last_start >= 0, positions.gather(1, last_start.clamp(min=0)), carry.base[:, None])  # (B, T)
    return documents, ends, bases, positions - bases


# --- attention ----------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, filled left to right.

    `length` counts the positions cached, and changes only through the cache's methods: in a forward
    pass every layer `append`s the keys and values of the new positions after them, then the model
    `advance`s the length past them; generation `truncate`s it to forget rejected draft tokens (their
    entries are overwritten by the next pass).
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self._length = 0
        # For a pattern that keeps to documents: per cached position (B, max_len) its document, whether it
        # ends one (an end-of-text token) and the position its document started at. Made on first use.
        self.documents: Optional[dict[str, torch.Tensor]] = None

    @property
    def length(self) -> int:
        return self._length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) after what is cached; return all keys and values so far (B, H, S, D)."""
        end = self._length + k.size(2)
        self.keys[layer, :, :, self._length:end] = k
        self.values[layer, :, :, self._length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, count: int) -> None:
        """The positions every layer has just appended are cached: count them."""
        if self._length + count > self.max_len:
            raise ValueError(f"{self._length} + {count} positions exceed the KV cache's {self.max_len}")
        self._length += count

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (the entries stay until they are overwritten)."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a KV cache of {self._length} positions to {length}")
        self._length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. when some samples have finished)."""
        self.keys = self.keys[:, index]
        self.values = self.values[:, index]
        if self.documents is not None:
            self.documents = {name: tensor[index] for name, tensor in self.documents.items()}

    def document_carry(self) -> Optional[DocumentCarry]:
        """Where the cached positions leave the documents: the next document's number, whether the last
        cached token ended one, the position its document started at; None for an empty cache."""
        if self.documents is None or self._length == 0:
            return None
        last = self._length - 1
        ended = self.documents["ends"][:, last]
        return DocumentCarry(self.documents["documents"][:, last] + ended.long(), ended, self.documents["bases"][:, last])

    def store_documents(self, documents: torch.Tensor, ends: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        """Record the new positions' documents (each (B, T), after the cached ones); return every key's (B, S)."""
        if self.documents is None:
            B = documents.size(0)
            self.documents = {name: torch.zeros(B, self.max_len, dtype=dtype, device=documents.device)
                              for name, dtype in (("documents", torch.long), ("ends", torch.bool), ("bases", torch.long))}
        end = self._length + documents.size(1)
        for name, tensor in (("documents", documents), ("ends", ends), ("bases", bases)):
            self.documents[name][:, self._length:end] = tensor
        return self.documents["documents"][:, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash/memory-efficient when it can)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer = config.n_head, config.head_dim, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: Optional[AttentionMask], rope: Optional[tuple],
                cache: Optional[KVCache]) -> torch.Tensor:
        """x (B, T, C) → (B, T, C). `mask` is None (plain causal), bool (B|1, 1, T, S), True = may attend, or
        a FlexAttention BlockMask (attention_mask_for decides)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # (B, H, S, D)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:  # a block mask: attention_mask_for chose FlexAttention (no dropout there)
            y = flex_attention_function(q.device.type)(q, k, v, block_mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# --- MLP and block ------------------------------------------------------------------------------------------


def activation_module(name: str) -> nn.Module:
    # "gelu_new" is GPT-2's tanh approximation of GELU (Hendrycks & Gimpel 2016).
    return {"gelu_new": nn.GELU(approximate="tanh"), "gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[name]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = activation_module(config.activation)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) → (B, T, C)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block; `norm_position` puts the LayerNorms before (GPT-2) or after (GPT-1) the add."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, rope: Optional[tuple] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x (B, T, C) → (B, T, C)."""
        if self.pre_norm:  # GPT-2: x + f(LN(x))
            x = x + self.attn(self.ln_1(x), mask, rope, cache)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, mask, rope, cache))  # GPT-1: LN(x + f(x))
        return self.ln_2(x + self.mlp(x))


# --- masks --------------------------------------------------------------------------------------------------


# What the model's `attention` takes: a pattern's name or reference (registry.ATTENTION), an AttentionPattern,
# or an explicit boolean mask (T, S), (B, T, S) or (B, 1, T, S), True where a query may attend a key.
Pattern = Union[str, AttentionPattern, torch.Tensor]
# What the blocks are given: None (plain causal), a dense bool mask (B|1, 1, T, S) or a FlexAttention BlockMask.
AttentionMask = Any

# Devices on which a pattern with a mask_mod runs as a FlexAttention block mask (where torch has it). The CPU
# takes the dense mask: FlexAttention there is an unfused reference without torch.compile (tests add "cpu"
# to compare the two paths).
FLEX_DEVICES = {"cuda"}


def attention_mask_for(config: ModelConfig, q_positions: torch.Tensor, key_length: int,
                       padding_mask: Optional[torch.Tensor] = None, pattern: Optional[Pattern] = None, *,
                       documents: Optional[torch.Tensor] = None, draw: Optional[Mapping[str, torch.Tensor]] = None,
                       flex: bool = False) -> AttentionMask:
    """The mask the blocks get: None = plain causal, else bool (B|1, 1, T, S) for SDPA, True where a query
    may attend a key, or with `flex` (and a pattern with a mask_mod, no padding, no cache) a BlockMask.

    q_positions: absolute key index of each query (T,) (cache offset included).
    padding_mask: (B, S) with 1 for real tokens, 0 for padding; becomes (B, 1, 1, S), keeping the key axis.
    pattern: config.attention when None; an explicit mask replaces the pattern.
    documents: (B, S) each key's document, for a pattern that keeps to documents (document_layout).
    draw: the objective's draw the pattern may read (MaskContext.draw).
    A query row left with no key (a padding position before any real token) may attend itself, so
    its output is finite instead of the NaN a softmax over nothing gives.
    """
    pattern = config.attention if pattern is None else pattern
    if not isinstance(pattern, torch.Tensor):
        pattern = attention_pattern(pattern, where="attention")
    T = q_positions.numel()
    plain_causal = (isinstance(pattern, AttentionPattern) and pattern.causal and not pattern.documents
                    and padding_mask is None)
    if plain_causal and (key_length == T or T == 1):
        return None  # is_causal (prefill from empty) or one new token that sees the whole cache
    keys = torch.arange(key_length, device=q_positions.device)
    if isinstance(pattern, torch.Tensor):
        mask = as_sdpa_mask(pattern.to(torch.bool))
    else:
        context = MaskContext(queries=q_positions, keys=keys, config=config, documents=documents, draw=draw)
        if flex and pattern.mask_mod is not None and padding_mask is None and key_length == T:
            return block_mask_for(pattern, context)
        mask = pattern_mask(pattern, context)
        if pattern.documents:
            mask = mask & context.same_document[:, None]  # (B, 1, T, S)
    if padding_mask is not None:
        mask = mask & padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, T, S)
    itself = (q_positions[:, None] == keys[None, :])[None, None]  # (1, 1, T, S)
    empty_row = ~mask.any(dim=-1, keepdim=True)  # (B|1, 1, T, 1)
    return mask | (empty_row & itself)


def pattern_mask(pattern: AttentionPattern, context: MaskContext) -> torch.Tensor:
    """A pattern's mask for SDPA (B|1, 1, T, S), checked: boolean, over these queries and keys. A mask
    function that fails (a user's, typically) is one sentence naming the pattern and the failure."""
    try:
        mask = pattern.mask(context)
    except GptError:
        raise
    except Exception as error:  # the pattern's own failure, whatever its type
        lines = str(error).strip().splitlines()
        said = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise GptError(f'The attention pattern "{pattern.name}" failed to make its mask: {said}.') from None
    expected = (context.queries.numel(), context.keys.numel())
    tensor = isinstance(mask, torch.Tensor)
    if not (tensor and mask.dtype == torch.bool and mask.dim() in (2, 3) and tuple(mask.shape[-2:]) == expected):
        shown = f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if tensor else type(mask).__name__
        raise GptError(f'The attention pattern "{pattern.name}" returned {shown}, not a boolean mask of shape '
                       f"(T, S) or (B, T, S) with (T, S) = {expected}.")
    return as_sdpa_mask(mask)


def as_sdpa_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (T, S), (B, T, S) or (B, 1, T, S) → (B|1, 1, T, S)."""
    mask = mask.view(1, 1, *mask.shape) if mask.dim() == 2 else mask  # (1, 1, T, S)
    return mask[:, None] if mask.dim() == 3 else mask  # (B|1, 1, T, S)


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def block_mask_for(pattern: AttentionPattern, context: MaskContext) -> Any:
    """The pattern's mask_mod as a FlexAttention BlockMask (blocks of 128 × 128 that are wholly masked are
    skipped), within documents for a pattern that keeps to them; one row per batch row when the mask reads
    the documents or the draw, else one for all."""
    from torch.nn.attention.flex_attention import create_block_mask

    mod = pattern.mask_mod(context)  # type: ignore[misc]  # the caller checked it is set
    documents = context.documents
    if pattern.documents and documents is not None:
        inner = mod

        def mod(b, h, q, k):
            return inner(b, h, q, k) & (documents[b, q] == documents[b, k])

    rows = documents.size(0) if documents is not None else None
    if context.draw:
        rows = next(iter(context.draw.values())).size(0)
    T, S = context.queries.numel(), context.keys.numel()
    return create_block_mask(mod, rows, None, T, S, device=context.queries.device)


_flex_functions: dict[str, Any] = {}


def flex_attention_function(device: str):
    """flex_attention, compiled once per process on CUDA (its fused kernel); the eager reference elsewhere."""
    if device not in _flex_functions:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_functions[device] = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
    return _flex_functions[device]


# --- the model ----------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f: Optional[nn.LayerNorm] = None  # GPT-1 has no final LayerNorm
        if config.final_norm:
            self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.activation_checkpointing = False
        self.pattern = attention_pattern(config.attention)  # resolved once: a forward pass asks no registry
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, unit LayerNorms, and residual projections
        (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2*n_layer) (Radford et al. 2019, section 2.3)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def new_kv_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        weight = self.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, max_len or c.block_size, c.head_dim, weight.device,
                       dtype or weight.dtype)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, attention: Optional[Pattern] = None,
                hidden_tokens: Optional[torch.Tensor] = None, draw: Optional[Mapping[str, torch.Tensor]] = None,
                return_logits: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Token ids → logits (next-token, or whatever the objective's targets say), and the mean
        cross-entropy when targets are given.

        idx: (B, T) token ids. targets: (B, T) ids to predict, -100 where nothing is scored.
        padding_mask: (B, S) 1 = real token, 0 = padding (S = cached + T positions).
        position_ids: (B, T) positions (default: cache offset + 0..T-1; restarted at 0 in each document for
        a pattern that keeps to documents). kv_cache: a KVCache to extend.
        attention: the pattern for this call instead of config.attention: a registered name ("causal",
        "document", "bidirectional", a plugin's, ...) or reference, an AttentionPattern, or a bool mask
        (T, S), (B, T, S) or (B, 1, T, S), True = may attend (padding_mask still applies on top of it).
        hidden_tokens: (B, T) bool, True where a position shows no token: its token embedding is left out
        and only its position enters (how objectives hide a token: objectives.py).
        draw: the objective's draw for these rows, which a pattern may read (MaskContext.draw).
        return_logits: False returns None for the logits (training needs only the loss).
        Returns (logits (B, T, vocab_size) or None, loss or None).
        """
        hidden = self.hidden_states(idx, padding_mask=padding_mask, position_ids=position_ids, kv_cache=kv_cache,
                                    attention=attention, hidden_tokens=hidden_tokens, draw=draw)
        logits = self.head(hidden)  # (B, T, V)
        loss = chunked_cross_entropy(logits, targets) if targets is not None else None
        return (logits if return_logits else None), loss

    def hidden_states(self, idx: torch.Tensor, *, padding_mask: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                      attention: Optional[Pattern] = None, hidden_tokens: Optional[torch.Tensor] = None,
                      draw: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """The final hidden states (B, T, C) that `head` turns into logits; arguments as for `forward`.

        Generation and evaluation call this directly so they can project only the positions they need
        (the last one while sampling, the scored ones in a sliding window) instead of all T × V logits.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        # Learned positions have a table of block_size rows. Rotary ones are computed for the positions
        # used, so a training sequence may be longer than block_size (train.seq_len allows it); only a
        # cache bounds them, by the room it was made with. Positions given explicitly are the caller's.
        if self.wpe is not None and position_ids is None and past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} positions exceeds the context of {self.config.block_size}")
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise ValueError(f"sequence of {past + T} positions exceeds the KV cache's {kv_cache.max_len}")
        pattern = self.pattern if attention is None else attention
        if not isinstance(pattern, torch.Tensor):
            pattern = attention_pattern(pattern, where="attention")
        q_positions = torch.arange(past, past + T, device=idx.device)
        if position_ids is None:
            position_ids = q_positions[None].expand(B, T)  # (B, T)
        documents = None
        if isinstance(pattern, AttentionPattern) and pattern.documents:
            documents, position_ids = self.documents_of(idx, position_ids, kv_cache)
        flex = idx.device.type in FLEX_DEVICES and kv_cache is None and flex_available() and not (
            self.training and self.config.dropout > 0)  # FlexAttention has no attention dropout
        mask = attention_mask_for(self.config, q_positions, past + T, padding_mask, pattern, documents=documents,
                                  draw=draw, flex=flex)

        x = self.wte(idx)  # (B, T, C)
        if hidden_tokens is not None:
            x = x.masked_fill(hidden_tokens[..., None], 0.0)  # a hidden token: its position alone
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)  # (B, T, C)
        else:
            rope = rotary_tables(position_ids, self.config.head_dim, self.config.rope_base)
        x = self.drop(x)
        for block in self.h:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, mask, rope, None, use_reentrant=False)
            else:
                x = block(x, mask, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x) if self.ln_f is not None else x

    def documents_of(self, idx: torch.Tensor, positions: torch.Tensor,
                     kv_cache: Optional[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        """(documents of every key (B, S), positions restarted per document (B, T)) for idx (B, T) after
        what the cache holds (document_layout; the cache records the new positions' documents)."""
        carry = kv_cache.document_carry() if kv_cache is not None else None
        documents, ends, bases, restarted = document_layout(idx, positions, self.config.eot_id, carry)
        if kv_cache is not None:
            documents = kv_cache.store_documents(documents, ends, bases)  # (B, S)
        return documents, restarted

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) → logits (..., vocab_size); vocabulary padding rows are never predicted."""
        return self.drop_vocab_padding(self.lm_head(hidden))  # (..., V)

    def drop_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocabulary (..., padded V) → over the real one (..., V)."""
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (..., V)
        return logits


# --- the loss -------------------------------------------------------------------------------------------------

# Rows of fp32 log-probabilities the loss holds at once: 2^26 values (256 MiB; 1,335 rows of GPT-2's 50,257).
LOSS_CHUNK_VALUES = 2**26


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), -100 = not scored, in fp32.

    F.cross_entropy over all B×T rows would keep B×T×V fp32 log-probabilities for the backward pass
    (3.2 GiB for 16 × 1,024 tokens of GPT-2, on top of the bf16 logits). Above LOSS_CHUNK_VALUES the rows
    go in chunks whose fp32 softmax is recomputed in the backward pass instead of kept (an elementwise
    pass over the chunk, no matmul). Up to that size it is F.cross_entropy itself, bit for bit.
    """
    flat_logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    flat_targets = targets.reshape(-1)  # (N,)
    rows = max(1, LOSS_CHUNK_VALUES // flat_logits.size(-1))
    if flat_logits.size(0) <= rows:
        return F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=-100)
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_logits.size(0), rows):
        total = total + checkpoint(summed_cross_entropy, flat_logits[start:start + rows],
                                   flat_targets[start:start + rows], use_reentrant=False)
    return total / (flat_targets != -100).sum()  # nan when nothing is scored, as F.cross_entropy


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


# The torch.nn.init functions that module constructors and GPT.reset_parameters call.
INIT_FUNCTIONS = ("uniform_", "normal_", "kaiming_uniform_", "ones_", "zeros_", "trunc_normal_")


@contextmanager
def initialisation_skipped():
    """Within the block, torch.nn.init leaves tensors as they are. A meta model has no values to
    initialise, and the init functions' meta kernels import torch._dynamo on first use: about a second,
    most of what `inspect-params gpt2-xl` would take after torch's own import."""
    import torch.nn.init

    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


# --- counting -----------------------------------------------------------------------------------------------


def build_model(config: ModelConfig, device: Optional[torch.device | str] = None) -> GPT:
    """A freshly initialised GPT; `device="meta"` builds the shapes without allocating weights, and without
    running the init functions: a meta tensor has no values to set, and their meta kernels import
    torch._dynamo, about a second of every model load (model_from_state_dict builds on meta)."""
    if str(device) == "meta":
        with initialisation_skipped(), torch.device("meta"):
            return GPT(config)
    with torch.device(device or "cpu"):
        return GPT(config)


def model_from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], *,
                          device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None,
                          where: str = "the weights") -> GPT:
    """A GPT holding exactly the tensors of `state` (gptcli names), moved to `device` / `dtype` when given.

    The model is built on the meta device and every tensor is assigned, so nothing is left at a random
    init and no second copy of the weights is made. With tied embeddings `lm_head.weight` may be absent
    or equal to `wte.weight`. Missing, unexpected or wrongly shaped tensors are one GptError naming them
    all, with `where` saying what was read."""
    model = build_model(config, device="meta")
    state = dict(state)
    tied = config.tie_embeddings
    if tied:
        head, embedding = state.pop("lm_head.weight", None), state.get("wte.weight")
        if head is not None and embedding is not None and head is not embedding and not torch.equal(head, embedding):
            raise GptError(f"{where} has an lm_head.weight that differs from wte.weight, but model.tie_embeddings "
                           "is true.")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{name} {list(state[name].shape)} (expected {list(expected[name])})"
             for name in sorted(set(expected) & set(state)) if tuple(state[name].shape) != expected[name]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise GptError(f"{where} does not fit the model config: {'; '.join(parts)}.")
    if tied:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if tied:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter; share it again
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
