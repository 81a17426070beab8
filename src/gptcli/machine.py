"""What this machine can hold: sizes a user types (a context length, a number of samples) are checked
against the memory there is before anything that large is allocated, so the answer is one sentence and not
the kernel's out-of-memory kill (exit 137, no message) or a swap storm. (Training asks the planner instead:
train/command.check_fits holds its plan against available_memory.)

The estimates are deliberately rough and err on the generous side: a refusal means the work clearly
cannot fit, not that it might be tight.
"""

from __future__ import annotations

import os
import time
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


def measure_cpu_flops(seconds: float = 0.2, size: int = 1024) -> float:
    """FLOP/s of fp32 square matmuls on this process's threads, timed for about `seconds`: what the planner
    times a CPU run by (gpt train's pre-flight, gpt inspect-params on a CPU project)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # the first call pays for thread start-up and allocation
    done, started = 0, time.perf_counter()
    while True:
        a @ b
        done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 2:
            return 2 * size**3 * done / elapsed


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
