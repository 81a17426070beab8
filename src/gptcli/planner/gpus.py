"""The accelerators the planner knows: memory and dense peak FLOP/s per GPU model, and sizes typed by users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import GptError

# --- accelerators ---------------------------------------------------------------------------------------------------

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One accelerator model: its memory and its dense (no sparsity) tensor-core peak."""

    name: str  # as `--gpu` takes it
    memory: int  # bytes: the data sheet's capacity (the driver exposes slightly less; see CUDA_CONTEXT_BYTES)
    peak_flops: float  # dense bf16 FLOP/s with fp32 accumulation; fp16 where the GPU has no bf16
    device_names: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that name this model
    source: str
    bf16: bool = True
    aliases: tuple[str, ...] = ()


# Matched against a device name in this order, so "H100 PCIe" wins over "H100", "GH200" over "H200" and
# "L40S" over "L4". Sources: NVIDIA's data sheets and architecture whitepapers (dense figures: half the
# "with sparsity" ones). H800 is H100 silicon with slower links: the same compute.
GPUS: tuple[Gpu, ...] = (
    Gpu("H100-PCIe", 80 * GiB, 756e12, ("H100 PCIe",), "NVIDIA H100 data sheet (PCIe: 756 TFLOPS BF16)"),
    Gpu("H100-NVL", 94 * GiB, 835e12, ("H100 NVL",), "NVIDIA H100 data sheet (NVL: 835 TFLOPS BF16, 94 GB)"),
    Gpu("H100-SXM", 80 * GiB, 989e12, ("H100",), "NVIDIA H100 data sheet (SXM5: 989 TFLOPS BF16, 80 GB)",
        aliases=("H100-80GB", "H100")),
    Gpu("H800-PCIe", 80 * GiB, 756e12, ("H800 PCIe",), "NVIDIA H800 data sheet (as H100 PCIe)"),
    Gpu("H800", 80 * GiB, 989e12, ("H800",), "NVIDIA H800 data sheet (as H100 SXM)"),
    Gpu("GH200", 96 * GiB, 989e12, ("GH200",), "NVIDIA GH200 data sheet (989 TFLOPS BF16, 96 GB HBM3)"),
    Gpu("H200-NVL", 141 * GiB, 835e12, ("H200 NVL",), "NVIDIA H200 data sheet (NVL: 835 TFLOPS BF16, 141 GB)"),
    Gpu("H200", 141 * GiB, 989e12, ("H200",), "NVIDIA H200 data sheet (SXM: 989 TFLOPS BF16, 141 GB)"),
    Gpu("B200", 180 * GiB, 2250e12, ("B200",), "NVIDIA HGX B200 data sheet (2.25 PFLOPS BF16 per GPU, 180 GB)"),
    Gpu("A100-80GB", 80 * GiB, 312e12, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB", "A100 PCIe 80GB"),
        "NVIDIA A100 data sheet (312 TFLOPS BF16, 80 GB)"),
    Gpu("A100-40GB", 40 * GiB, 312e12, ("A100",), "NVIDIA A100 data sheet (312 TFLOPS BF16, 40 GB)",
        aliases=("A100",)),
    Gpu("L40S", 48 * GiB, 362e12, ("L40S",), "NVIDIA L40S data sheet (362 TFLOPS BF16, 48 GB)"),
    Gpu("L40", 48 * GiB, 181e12, ("L40",), "NVIDIA L40 data sheet (181 TFLOPS BF16, 48 GB)"),
    Gpu("L4", 24 * GiB, 121e12, ("L4",), "NVIDIA L4 data sheet (121 TFLOPS BF16, 24 GB)"),
    Gpu("A10G", 24 * GiB, 125e12, ("A10G",), "NVIDIA A10 data sheet (125 TFLOPS BF16, 24 GB); A10G is AWS's A10"),
    Gpu("A10", 24 * GiB, 125e12, ("A10",), "NVIDIA A10 data sheet (125 TFLOPS BF16, 24 GB)"),
    Gpu("RTX-A6000", 48 * GiB, 155e12, ("RTX A6000",), "NVIDIA RTX A6000 data sheet (309.7 TFLOPS tensor with "
        "sparsity, 48 GB)"),
    Gpu("RTX-4090", 24 * GiB, 165e12, ("RTX 4090",), "NVIDIA Ada Lovelace whitepaper (RTX 4090: 165.2 TFLOPS "
        "BF16 with FP32 accumulate, 24 GB)"),
    Gpu("RTX-3090", 24 * GiB, 71e12, ("RTX 3090",), "NVIDIA Ampere GA102 whitepaper (RTX 3090: 71 TFLOPS "
        "BF16 with FP32 accumulate, 24 GB)"),
    Gpu("V100-32GB", 32 * GiB, 125e12, ("V100-SXM2-32GB", "V100-PCIE-32GB", "V100 32GB"),
        "NVIDIA V100 data sheet (SXM2: 125 TFLOPS FP16, no BF16 tensor cores, 32 GB)", bf16=False),
    Gpu("V100-16GB", 16 * GiB, 125e12, ("V100",), "NVIDIA V100 data sheet (SXM2: 125 TFLOPS FP16, no BF16 "
        "tensor cores, 16 GB)", bf16=False, aliases=("V100",)),
    Gpu("T4", 16 * GiB, 65e12, ("Tesla T4", "T4"), "NVIDIA T4 data sheet (65 TFLOPS FP16, no BF16, 16 GB)",
        bf16=False),
)


def gpu_names() -> list[str]:
    return [gpu.name for gpu in GPUS]


def find_gpu(name: str) -> Gpu:
    """A GPU of the table by name or alias, case and separators ignored; else one sentence naming the
    closest names."""
    import difflib

    def key(text: str) -> str:
        return "".join(c for c in text.lower() if c.isalnum())

    for gpu in GPUS:
        if key(name) in {key(gpu.name), *map(key, gpu.aliases)}:
            return gpu
    close = [gpu.name for gpu in GPUS if key(gpu.name).startswith(key(name))] if key(name) else []
    close = close or difflib.get_close_matches(name.upper(), gpu_names(), n=3, cutoff=0.5)
    known = f"did you mean {', '.join(close[:3])}?" if close else f"known: {', '.join(gpu_names())}"
    raise GptError(f'Unknown GPU "{name}" ({known}); for another GPU give its memory with --gpu-memory.')


def gpu_for_device_name(device_name: str) -> Optional[Gpu]:
    """The table's entry for a CUDA device name (torch.cuda.get_device_name()), or None."""
    return next((gpu for gpu in GPUS if any(part in device_name for part in gpu.device_names)), None)


MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# The sizes --gpu-memory accepts: from 1 MiB (below it a plan cannot hold a weight) to 1 PiB (a thousand times
# the largest GPU of the table), so that 1e400 (infinite as a float) or 0.0000001 (0 bytes) is refused.
MEMORY_RANGE = (2**20, 2**50)


def parse_memory(text: str) -> int:
    """`80GiB`, `80 GB`, `81920MiB`, `8e10` → bytes (GB is 10^9, GiB 2^30), within MEMORY_RANGE."""
    import math
    import re

    shown = text if len(text) <= 40 else text[:37] + "..."
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in MEMORY_UNITS:
        raise GptError(f'--gpu-memory must be a size such as 80GiB, 24GB or 81920MiB, not "{shown}".')
    size = float(match.group(1)) * MEMORY_UNITS[match.group(2)]
    low, high = MEMORY_RANGE
    if not math.isfinite(size) or not low <= size <= high:
        raise GptError(f'--gpu-memory must be a size such as 80GiB, 24GB or 81920MiB, from 1MiB to 1PiB, not '
                       f'"{shown}".')
    return int(size)
