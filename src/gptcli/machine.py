"""What this machine can hold: sizes a user types (a context length, a number of samples) are checked
against the memory there is before anything that large is allocated, so the answer is one sentence and not
the kernel's out-of-memory kill (exit 137, no message) or a swap storm.

The estimates are deliberately rough and err on the generous side: a refusal means the work clearly
cannot fit, not that it might be tight.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import GptError

GIB = 2**30


def available_memory(device: str = "cpu") -> Optional[int]:
    """Bytes free for new allocations: MemAvailable on the host (Linux), free memory on a CUDA device;
    None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index
        return torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: int, what: str, advice: str, device: str = "cpu", available: Optional[int] = None) -> None:
    """Refuse `what` when its `needed` bytes exceed what `device` has free, with `advice` (what to change)."""
    free = available if available is not None else available_memory(device)
    if free is None or needed <= free:
        return
    where = "this GPU" if device.startswith("cuda") else "this machine"
    raise GptError(f"{what} needs about {gib(needed)} of memory, more than the {gib(free)} {where} has free; "
                   f"{advice}.")


def gib(count: int) -> str:
    return f"{count / GIB:,.1f} GiB"


def parameter_floor(model) -> int:
    """At least this many parameters (model: a ModelConfig), without building the model: the embeddings,
    the position table and each block's attention and MLP matrices (biases and norms left out)."""
    width = model.n_embd
    count = model.padded_vocab_size * width + (model.block_size * width if model.position == "learned" else 0)
    return count + model.n_layer * (4 + 2 * model.mlp_ratio) * width * width


def check_training_fits(project, local_ranks: int, device: str) -> None:
    """Refuse a run whose model and batch clearly cannot fit, before any rank builds anything: on the CPU
    each of the `local_ranks` ranks of this machine holds fp32 weights and gradients (8 bytes a parameter)
    and they share Adam's two moments (8 more); every rank also keeps each block's input for backward.
    On a GPU the floor is ZeRO-3's (16 bytes a parameter over all ranks) unless parameters are offloaded."""
    model, train = project.model, project.train
    seq_len = train.seq_len or model.block_size
    parameters = parameter_floor(model)
    activations = model.n_layer * train.micro_batch_size * seq_len * model.n_embd * 4
    if device == "cpu":
        needed = parameters * (8 * local_ranks + 8) + local_ranks * activations
    elif project.deepspeed.offload_params:
        return
    else:
        needed = parameters * 16 // max(1, local_ranks) + activations
    check_fits(needed, f"Training this model (at least {parameters:,} parameters; micro_batch_size "
                       f"{train.micro_batch_size} × seq_len {seq_len:,} per rank, {local_ranks} rank(s) here)",
               "make the model smaller (model.block_size, n_embd, n_layer) or train.micro_batch_size / seq_len",
               device)


def check_generation_fits(config, rows: int, prompt_tokens: int, new_tokens: int, device: str) -> None:
    """`gpt generate`: every sample is a row of one batch: its KV cache (keys and values of every layer)
    and each step's logits over the vocabulary, which sampling copies a few times (scaling, filtering,
    softmax, sorting for top-p), in fp32."""
    length = min(config.block_size, prompt_tokens + new_tokens)
    cache = 2 * config.n_layer * rows * length * config.n_embd * 4
    logits = 8 * rows * config.padded_vocab_size * 4
    prefill = rows * prompt_tokens * config.n_embd * 4 * (4 + config.mlp_ratio)
    check_fits(cache + logits + prefill, f"Generating {rows:,} sample(s) of up to {length:,} tokens",
               "ask for fewer (--num-samples, fewer prompts) or fewer --max-new-tokens", device)


def check_task_scoring_fits(config, batch_size: int, width: int, rows: int, device: str) -> None:
    """`gpt eval --task`: the widest batch of packed examples (`width` tokens each), its attention weights
    and the log-softmax of its `rows` predicting positions (fp32, and a copy)."""
    tokens = batch_size * width
    needed = (tokens * ((4 + config.mlp_ratio) * config.n_embd + 2 * config.n_head * width) * 4
              + rows * config.padded_vocab_size * 4 * 2)
    check_fits(needed, f"Scoring a batch of {batch_size:,} × {width:,} tokens of task examples",
               "give a smaller --batch-size", device)


def check_scoring_fits(config, batch_size: int, device: str) -> None:
    """`gpt eval`: a batch of full-context windows and its logits (fp32, and a copy for the loss)."""
    tokens = batch_size * config.block_size
    needed = tokens * (2 * config.padded_vocab_size + (4 + config.mlp_ratio) * config.n_embd) * 4
    check_fits(needed, f"Scoring {batch_size:,} windows of {config.block_size:,} tokens at once",
               "give a smaller --batch-size", device)
