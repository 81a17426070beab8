"""Sampling from a GPT with a KV cache.

The prompts are left-padded into one batch and run through the model once (the prefill); after that each
step feeds only the newest token of every row and reads the keys and values of everything before it from
the cache. Left padding keeps the newest token of every row in the same column; the padding mask hides
the pad keys and the position ids restart at 0 at each row's first real token, so a row of a batch sees
exactly what it would see alone.

When the batch reaches the end of the context the window slides: the newest 3/4 of the context is
prefilled into a fresh cache and generation goes on (a prompt longer than the context is cropped from the
left first). The batch slides when its longest row is full, so from then on a shorter row may see less
context than it would alone.
"""

from __future__ import annotations

import codecs
import dataclasses
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import GenerateConfig, Project
from .errors import GptError, UsageError
from .machine import check_generation_fits
from .model import GPT

# After a slide the window keeps this share of the context, so the next block_size/4 steps are cheap
# cache steps again instead of a full re-prefill per token.
SLIDE_KEEP = 3 / 4


# How to pick tokens is the [generate] section itself: one schema, validated when it is built.
SamplingOptions = GenerateConfig


@dataclass
class Sample:
    """One generated continuation."""

    prompt: str
    prompt_index: int
    text: str  # the continuation, without the prompt, end-of-text or stop string
    tokens: list[int]  # the generated ids (end-of-text left out)
    finish_reason: str  # "eot", "stop" (a stop string) or "length" (max_new_tokens)
    prompt_tokens: int  # prompt ids the model saw (after any crop)
    cropped_tokens: int = 0  # prompt ids dropped from the left to fit the context

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "tokens": self.tokens,
                "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "cropped_tokens": self.cropped_tokens}


# --- choosing the next token ------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set with mass ≥ top_p).

    logits: (B, V) → (B, V). Ties at the k-th value are all kept; the most likely token always survives.
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the nucleus is already complete without this token
        # The most likely token always stays: a top_p below float32's smallest number (1e-300) is 0 in the
        # comparison, which would otherwise drop every token and leave nothing to sample.
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, options: SamplingOptions, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick one id per row from last-position logits (B, V) → (B,)."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / options.temperature
    if not bool(torch.isfinite(scaled).all()):  # a temperature so small that logit/T overflows: the limit is greedy
        return logits.argmax(dim=-1)
    logits = filter_logits(scaled, options.top_k, options.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(device: torch.device, seed: Optional[int]) -> torch.Generator:
    """A private RNG, so samples depend on `seed` alone and not on the global torch RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# --- the batch as it grows --------------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prompts → tokens (B, L) padded on the left, and the padding mask (B, L) (None when nothing is padded)."""
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, length - len(ids):] = 1
    if bool(mask.all()):
        return tokens.to(device), None
    return tokens.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that start at 0 at each row's first real token (pads get 0; they are masked)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


# Up to this many rows, the CPU vocabulary projection puts the weight on the left (see next_logits).
SMALL_HEAD_ROWS = 8


def next_logits(model: GPT, hidden: torch.Tensor) -> torch.Tensor:
    """model.head for the few positions generation projects at a time: hidden (..., C) → logits (..., V).

    A few rows (batched sampling, draft verification) against the 50257-row head: on a CPU the product
    with the weight on the left runs at the one-row speed, where the usual form took about 2.5x longer
    for 2 to 8 rows (bench/generate.py, MKL sgemm). Training and evaluation project many rows at once,
    where the usual form is the fast one."""
    rows = hidden.numel() // hidden.size(-1)
    if hidden.device.type != "cpu" or not 1 < rows <= SMALL_HEAD_ROWS:
        return model.head(hidden)
    flat = hidden.reshape(rows, hidden.size(-1))  # (rows, C)
    logits = (model.lm_head.weight @ flat.T).T.reshape(*hidden.shape[:-1], -1)  # (..., padded V)
    return model.drop_vocab_padding(logits)  # (..., V)


def compute_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on (the cache then holds bf16 keys), else None (the weights' dtype)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class BatchState:
    """The token matrix, its padding mask and the KV cache of a batch being generated.

    `prefill` runs the current window through the model; `advance` appends one token per row and returns
    the logits for the next one, sliding the window when the cache is full.
    """

    def __init__(self, model: GPT, tokens: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int):
        self.model, self.tokens, self.mask = model, tokens, mask
        self.block_size = model.config.block_size
        self.cache_len = min(self.block_size, tokens.size(1) + max_new_tokens)
        self.start = 0  # first column of the window the cache holds

    def prefill(self, start: int) -> torch.Tensor:
        """Fill a fresh cache with columns start.. of the batch; return next-token logits (B, V)."""
        self.start = start
        window = self.tokens[:, start:]  # (B, T)
        mask = self.mask[:, start:] if self.mask is not None else None
        self.cache = self.model.new_kv_cache(window.size(0), self.cache_len, dtype=compute_dtype(window.device))
        positions = positions_from_mask(mask) if mask is not None else None
        hidden = self.model.hidden_states(window, padding_mask=mask, position_ids=positions, kv_cache=self.cache)
        return next_logits(self.model, hidden[:, -1])  # (B, V): only the last position is needed

    def advance(self, new: torch.Tensor) -> torch.Tensor:
        """Append `new` (B,) and return the logits (B, V) that follow it."""
        if self.cache.length >= self.cache.max_len:
            self.append(new[:, None])
            keep = max(1, int(self.block_size * SLIDE_KEEP))
            return self.prefill(self.tokens.size(1) - keep)
        return self.advance_many(new[:, None])[:, -1]

    def advance_many(self, new: torch.Tensor) -> torch.Tensor:
        """Append `new` (B, m), which must fit in the cache; return the logits (B, m, V) after each."""
        m = new.size(1)
        self.append(new)
        mask = self.mask[:, self.start:] if self.mask is not None else None  # (B, cached + m)
        positions = positions_from_mask(mask)[:, -m:] if mask is not None else None  # (B, m)
        hidden = self.model.hidden_states(new, padding_mask=mask, position_ids=positions, kv_cache=self.cache)
        return next_logits(self.model, hidden)  # (B, m, V)

    def append(self, new: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, new], dim=1)  # (B, L + m)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)

    def rollback(self, count: int) -> None:
        """Forget the last `count` tokens (rejected draft tokens); their cache entries get overwritten."""
        if count:
            self.tokens = self.tokens[:, :-count]
            self.mask = self.mask[:, :-count] if self.mask is not None else None
            self.cache.truncate(self.cache.length - count)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop finished rows so later steps compute only the live ones."""
        self.tokens = self.tokens[index]
        self.mask = self.mask[index] if self.mask is not None else None
        self.cache.reorder(index)


def generate_ids(model: GPT, prompts: list[list[int]], options: SamplingOptions, eot_id: Optional[int] = None,
                 on_token: Optional[Callable[[int, int], bool]] = None) -> tuple[list[list[int]], list[str]]:
    """Generate for every prompt (each must fit the context); one row per prompt.

    on_token(row, id) is called for each new id (end-of-text excepted) and returns True when that row
    should stop (a stop string). Returns (generated ids per row, finish reason per row).
    """
    if options.lookahead > 0 and options.temperature == 0 and len(prompts) == 1:
        return generate_with_lookahead(model, prompts[0], options, eot_id, on_token)
    device = model.wte.weight.device
    generator = make_generator(device, options.seed) if options.temperature > 0 else None
    pad_id = eot_id if eot_id is not None else 0
    tokens, mask = left_pad(prompts, pad_id, device)
    state = BatchState(model, tokens, mask, options.max_new_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    live = list(range(len(prompts)))  # batch row → prompt row
    logits = state.prefill(0)
    for step in range(options.max_new_tokens):
        chosen = next_tokens(logits, options, generator).tolist()
        finished = []
        for batch_row, token in enumerate(chosen):
            row = live[batch_row]
            if token == eot_id:
                reasons[row] = "eot"
            else:
                outputs[row].append(token)
                if on_token is not None and on_token(row, token):
                    reasons[row] = "stop"
            if reasons[row] != "length":
                finished.append(batch_row)
        if step == options.max_new_tokens - 1 or len(finished) == len(live):
            break
        new = torch.tensor(chosen, device=device)
        if finished:
            done = set(finished)
            index = [r for r in range(len(live)) if r not in done]
            live = [live[r] for r in index]
            state.keep_rows(torch.tensor(index, device=device))
            logits, new = logits[index], new[index]
        logits = state.advance(new)
    return outputs, reasons


# --- greedy decoding with prompt-lookup drafts -----------------------------------------------------------
#
# Decoding one token reads every weight once (about 500 MB for GPT-2 124M in fp32), so on a CPU a step
# costs what memory bandwidth allows whatever the code around it does. Prompt lookup (Saxena 2023) feeds
# a guess of the next few tokens along with the newest one: the guess is what followed the latest earlier
# occurrence of the text's last n-gram. One forward pass then checks the whole guess; the greedy choices
# that agree with it are kept, so the output is the greedy output, several tokens per weight read when
# the text repeats itself (as greedy text does).

LOOKUP_NGRAM = 3  # longest n-gram matched; shorter ones are tried when it finds nothing


def draft_tokens(sequence: list[int], size: int) -> list[int]:
    """Up to `size` tokens that followed the latest earlier occurrence of the sequence's last n-gram.

    A match close to the end continues into the draft itself, so a loop of period p is drafted whole."""
    for n in range(min(LOOKUP_NGRAM, len(sequence) - 1), 0, -1):
        tail = sequence[-n:]
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start:start + n] == tail:
                extended = list(sequence)
                for offset in range(size):
                    extended.append(extended[start + n + offset])
                return extended[len(sequence):]
    return []


def generate_with_lookahead(model: GPT, prompt: list[int], options: SamplingOptions, eot_id: Optional[int],
                            on_token: Optional[Callable[[int, int], bool]]) -> tuple[list[list[int]], list[str]]:
    """Greedy decoding of one prompt, verifying prompt-lookup drafts; same result as generate_ids."""
    device = model.wte.weight.device
    tokens, _ = left_pad([prompt], 0, device)
    state = BatchState(model, tokens, None, options.max_new_tokens)
    sequence, output = list(prompt), []
    pending = int(state.prefill(0)[0].argmax().item())  # the greedy token not yet emitted

    def emit(token: int) -> Optional[str]:
        if token == eot_id:
            return "eot"
        output.append(token)
        sequence.append(token)
        if on_token is not None and on_token(0, token):
            return "stop"
        return "length" if len(output) == options.max_new_tokens else None

    while (reason := emit(pending)) is None:
        room = min(options.lookahead, options.max_new_tokens - len(output) - 1,
                   state.cache.max_len - state.cache.length - 1)
        draft = draft_tokens(sequence, room) if room > 0 else []
        if not draft:
            pending = int(state.advance(torch.tensor([pending], device=device))[0].argmax().item())
            continue
        fed = torch.tensor([[pending, *draft]], device=device)  # (1, 1 + k)
        choices = state.advance_many(fed)[0].argmax(dim=-1).tolist()  # greedy token after each fed one
        accepted = 0
        while accepted < len(draft) and choices[accepted] == draft[accepted]:
            accepted += 1
        state.rollback(len(draft) - accepted)
        for token in draft[:accepted]:
            if (reason := emit(token)) is not None:
                return [output], [reason]
        pending = choices[accepted]
    return [output], [reason]


# --- text in, text out ------------------------------------------------------------------------------------


class RowText:
    """The text of one sample as its ids arrive: incremental UTF-8 decoding (a character split across
    tokens appears once whole), stop strings, and the part that is safe to show while streaming."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.stopped = False
        self.shown = 0

    def add(self, token: int) -> bool:
        """Take one id; True when the text now contains a stop string (the text is cut before it)."""
        before = len(self.text)
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, before - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return self.stopped

    def finish(self) -> None:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)

    def unshown(self, final: bool = False) -> str:
        """Text not yet shown, holding back a tail that could still grow into a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            for cut in range(max(self.shown, end - max((len(s) for s in self.stop), default=0)), end):
                if any(s.startswith(self.text[cut:]) for s in self.stop):
                    end = cut
                    break
        piece, self.shown = self.text[self.shown:end], max(self.shown, end)
        return piece


def encode_prompt(tokenizer, prompt: str, block_size: int) -> tuple[list[int], int]:
    """Prompt → ids that fit the context (cropped from the left), and how many ids were dropped.

    An empty prompt starts from end-of-text, the way GPT-2 samples unconditionally."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise GptError("The prompt is empty and this tokenizer has no end-of-text token to start from.")
        ids = [tokenizer.eot_id]
    dropped = max(0, len(ids) - block_size)
    return ids[dropped:], dropped


def lone_space_note(tokenizer, prompt: str) -> Optional[str]:
    """What to say about a prompt whose last token is only spaces: a BPE like GPT-2's joins the space before
    a word to the word's token, so a model meets a lone space token mostly inside runs of spaces (indentation),
    and continues such a prompt with more of them. The rest of a sentence whose subject is the prompt; None for
    any other prompt (a trailing newline is a token of its own in the training text too)."""
    ids = tokenizer.encode(prompt)
    last = tokenizer.decode(ids[-1:]) if ids else ""
    if not last or last.strip(" \t"):
        return None
    kept = prompt.rstrip(" \t")
    shown = kept if len(kept) <= 30 else "…" + kept[-29:]
    return (f'ends in {"a space" if last == " " else "whitespace"}, a token of its own: {tokenizer.name}\'s BPE '
            'joins the space before a word to the word (" the" is one token), so the model has seen a lone space '
            f'mostly inside runs of spaces; "{shown}" without it lets the model pick the next word and its space.')


def generate(model: GPT, tokenizer, prompts: list[str], options: SamplingOptions,
             on_text: Optional[Callable[[int, str], None]] = None,
             on_notice: Optional[Callable[[str], None]] = None) -> list[Sample]:
    """Generate `options.num_samples` continuations of every prompt, all in one batch.

    on_text(row, piece) receives text as it is produced (rows are prompt-major: prompt i, sample j is
    row i * num_samples + j); on_notice receives messages such as a prompt crop.
    """
    encoded = [encode_prompt(tokenizer, p, model.config.block_size) for p in prompts]
    for index, (ids, dropped) in enumerate(encoded):
        if dropped and on_notice is not None:
            on_notice(f"Prompt {index + 1} has {len(ids) + dropped} tokens, more than the context of "
                      f"{model.config.block_size}; using its last {len(ids)} tokens.")
        if on_notice is not None and (note := lone_space_note(tokenizer, prompts[index])):
            on_notice(f"Prompt {index + 1} {note}")
    rows = [(index, ids) for index, (ids, _) in enumerate(encoded) for _ in range(options.num_samples)]
    check_generation_fits(model.config, len(rows), max(len(ids) for ids, _ in encoded), options.max_new_tokens,
                          model.wte.weight.device.type)
    stop = tuple(s for s in options.stop if s)  # an empty stop string would end every sample at once
    texts = [RowText(tokenizer, stop) for _ in rows]

    def on_token(row: int, token: int) -> bool:
        stopped = texts[row].add(token)
        if on_text is not None:
            piece = texts[row].unshown()
            if piece:
                on_text(row, piece)
        return stopped

    with torch.inference_mode():
        generated, reasons = generate_ids(model, [ids for _, ids in rows], options, tokenizer.eot_id, on_token)
    samples = []
    for row, (index, prompt_ids) in enumerate(rows):
        texts[row].finish()
        if on_text is not None:
            piece = texts[row].unshown(final=True)
            if piece:
                on_text(row, piece)
        samples.append(Sample(prompt=prompts[index], prompt_index=index, text=texts[row].text, tokens=generated[row],
                              finish_reason=reasons[row], prompt_tokens=len(prompt_ids),
                              cropped_tokens=encoded[index][1]))
    return samples


def sample_text(model: GPT, tokenizer, prompt: str, options: SamplingOptions) -> str:
    """One continuation of `prompt` as text, picked as `options` (a [generate] section) say: the periodic
    samples during training pass the project's own, with their length and seed.

    The model is put in eval mode for the call and returned to the mode it was in."""
    options = dataclasses.replace(options, num_samples=1)
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, [prompt], options)[0].text
    finally:
        model.train(was_training)


# --- gpt generate -----------------------------------------------------------------------------------------


@dataclass
class Generation:
    samples: list[Sample]
    streamed: bool  # the prompt and the text went to `stream` as they were made


def read_prompts(prompts: Optional[list[str]], default: str) -> list[str]:
    """The prompts as given ("-" = stdin); the [generate] prompt when none is given."""
    prompts = prompts or [default]
    if prompts.count("-") > 1:
        raise UsageError("PROMPT: stdin can be read once; give '-' at most once.")
    texts = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in prompts]
    for index, text in enumerate(texts):
        if not text.strip():
            where = "from stdin" if prompts[index] == "-" else f"number {index + 1}"
            raise GptError(f"The prompt {where} is empty; give some text to continue.")
    return texts


def generate_for_project(project: Project, prompts: Optional[list[str]], *, checkpoint: Optional[Path] = None,
                         device: str = "auto", bf16: bool = False, stream: Optional[Callable[[str], None]] = None,
                         on_notice: Optional[Callable[[str], None]] = None) -> Generation:
    """`gpt generate`: continue the prompts with the model of `checkpoint` (else the project's run dir)
    using the project's [generate] settings, options of the command line already applied as overrides.

    With `stream` and a single sample to make (one prompt, num_samples 1) the prompt and then the text
    go to `stream` as they are made; otherwise the samples come back together."""
    from .runtime import load_project_model, resolve_device

    options = project.generate
    if options.seed is None:  # unset means the project's seed, so a run is repeatable by default
        options = dataclasses.replace(options, seed=project.project.seed)
    texts = read_prompts(prompts, options.prompt)
    target = resolve_device(device)
    loaded = load_project_model(project, checkpoint, target)
    streaming = stream if len(texts) == 1 and options.num_samples == 1 else None
    if streaming is not None:
        streaming(texts[0])
    autocast = torch.autocast(target.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        samples = generate(loaded.model, loaded.tokenizer, texts, options,
                           on_text=(lambda row, piece: streaming(piece)) if streaming is not None else None,
                           on_notice=on_notice)
    return Generation(samples, streamed=streaming is not None)
