"""The accelerators the planner knows: the memory PyTorch sees on each GPU model, its dense peak FLOP/s per
precision, the CUDA context it costs, and sizes typed by users. Sources are in docs/planning.md's table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import GptError

# --- accelerators ---------------------------------------------------------------------------------------------------

GiB = 2**30
MiB = 2**20
TFLOPS = 1e12


@dataclass(frozen=True)
class Gpu:
    """One accelerator model: the memory a process sees, and its dense (no sparsity) peaks."""

    name: str  # as `--gpu` takes it
    generation: str  # volta, turing, ampere, ada, hopper, blackwell: what the MFU and the CUDA context go by
    memory: int  # bytes, as torch.cuda.get_device_properties().total_memory reports them (below the data sheet's GB)
    peak_16bit: float  # dense tensor-core FLOP/s, bf16 (fp16 where there is no bf16) with fp32 accumulation
    peak_tf32: Optional[float]  # dense TF32 tensor-core FLOP/s (None before Ampere: no TF32)
    peak_fp32: float  # FP32 without tensor cores
    device_names: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that name this model
    source: str  # where the peaks come from
    memory_source: str  # where the memory comes from: a published torch log, or how it is estimated
    bf16: bool = True
    nvls: bool = False  # NVLink SHARP through NVSwitch (HGX Hopper and Blackwell): NCCL keeps more buffers
    aliases: tuple[str, ...] = ()

    @property
    def peak_flops(self) -> float:
        """The 16-bit peak: what a GPU is usually quoted at, and what MFU is taken against for bf16/fp16."""
        return self.peak_16bit

    def peak_for(self, precision: str) -> float:
        """The dense peak a run at `precision` can reach: the 16-bit tensor cores for bf16/fp16 (bf16 on a GPU
        without bf16 tensor cores falls back to fp32 arithmetic); for fp32, TF32 tensor cores where the GPU has
        them (gptcli turns TF32 on: train/engine.prepare_device), else FP32."""
        if precision == "fp16" or (precision == "bf16" and self.bf16):
            return self.peak_16bit
        return self.peak_tf32 or self.peak_fp32


def row(name: str, generation: str, memory_mib: int, peaks: tuple[float, Optional[float], float],
        device_names: tuple[str, ...], source: str, memory_source: str, **extra) -> Gpu:
    """A table row: memory in MiB as torch prints it (`total_memory=81089MB` is MiB), peaks in TFLOP/s
    (16-bit, TF32, FP32)."""
    bf16, tf32, fp32 = peaks
    return Gpu(name, generation, memory_mib * MiB, bf16 * TFLOPS, tf32 * TFLOPS if tf32 else None, fp32 * TFLOPS,
               device_names, source, memory_source, **extra)


# Memory: what torch reports as total_memory, read from published `torch.cuda.get_device_properties()`
# and deviceQuery logs; where none was found, estimated from nvidia-smi's total as the memory_source says
# (the driver keeps about 0.6% back: an H100 SXM shows 81,559 MiB in nvidia-smi and 81,089 MiB to torch).
# Peaks: NVIDIA's data sheets and architecture whitepapers, dense (half the "with sparsity" figures).
# Matched against a device name in this order, so "H100 PCIe" wins over "H100", "GH200" over "H200" and
# "L40S" over "L4". H800 is H100 silicon with slower links: the same compute.
TORCH_LOG = "published torch log"
GPUS: tuple[Gpu, ...] = (
    row("H100-PCIe", "hopper", 81008, (756, 378, 51), ("H100 PCIe",), "NVIDIA H100 data sheet, PCIe",
        f"{TORCH_LOG}: total_memory=81008MB"),
    row("H100-NVL", "hopper", 95278, (835, 418, 60), ("H100 NVL",), "NVIDIA H100 data sheet, NVL",
        "estimated: nvidia-smi's 95,830 MiB less H100 SXM's share the driver keeps"),
    row("H100-SXM", "hopper", 81089, (989, 495, 67), ("H100",), "NVIDIA H100 data sheet, SXM5",
        f"{TORCH_LOG}: total_memory=81089MB", nvls=True, aliases=("H100-80GB", "H100")),
    row("H800-PCIe", "hopper", 81008, (756, 378, 51), ("H800 PCIe",), "NVIDIA H800 data sheet (as H100 PCIe)",
        "estimated: as H100 PCIe"),
    row("H800", "hopper", 81089, (989, 495, 67), ("H800",), "NVIDIA H800 data sheet (as H100 SXM)",
        "estimated: as H100 SXM"),  # NCCL finds no NVLS on H800 (NVIDIA/nccl #892)
    row("GH200", "hopper", 97307, (989, 495, 67), ("GH200",), "NVIDIA GH200 data sheet",
        "estimated: nvidia-smi's 97,871 MiB less H100 SXM's share the driver keeps"),
    row("H200-NVL", "hopper", 143156, (835, 418, 60), ("H200 NVL",), "NVIDIA H200 data sheet, NVL",
        "estimated: as H200"),
    row("H200", "hopper", 143156, (989, 495, 67), ("H200",), "NVIDIA H200 data sheet, SXM",
        f"{TORCH_LOG}: total_memory=143156MB", nvls=True),
    row("B200", "blackwell", 182631, (2250, 1100, 75), ("B200",), "NVIDIA HGX B200 data sheet, per GPU",
        f"{TORCH_LOG}: total_memory=182631MB", nvls=True),
    row("A100-80GB", "ampere", 81251, (312, 156, 19.5),
        ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB", "A100 PCIe 80GB"), "NVIDIA A100 data sheet",
        "published deviceQuery log (A100-SXM4-80GB): 81251 MBytes"),
    row("A100-40GB", "ampere", 40536, (312, 156, 19.5), ("A100",), "NVIDIA A100 data sheet",
        f"{TORCH_LOG}: A100-SXM4-40GB total_memory=40536MB (the PCIe card shows 40326MB)", aliases=("A100",)),
    row("L40S", "ada", 45589, (362, 183, 91.6), ("L40S",), "NVIDIA L40S data sheet",
        f"{TORCH_LOG}: total_memory=45589MB"),
    row("L40", "ada", 45589, (181, 90.5, 90.5), ("L40",), "NVIDIA L40 data sheet", "estimated: as L40S"),
    row("L4", "ada", 22565, (121, 60, 30.3), ("L4",), "NVIDIA L4 data sheet",
        "estimated: nvidia-smi's 23,034 MiB less the 469 MiB it shows the driver keeping"),
    row("A10G", "ampere", 22587, (125, 62.5, 31.2), ("A10G",), "NVIDIA A10 data sheet (A10G is AWS's A10)",
        f"{TORCH_LOG}: total_memory=22587MB"),
    row("A10", "ampere", 22587, (125, 62.5, 31.2), ("A10",), "NVIDIA A10 data sheet", "estimated: as A10G"),
    row("RTX-A6000", "ampere", 48676, (155, 77.4, 38.7), ("RTX A6000",), "NVIDIA RTX A6000 data sheet",
        f"{TORCH_LOG}: total_memory=48676MB"),
    row("RTX-4090", "ada", 24563, (165, 82.6, 82.6), ("RTX 4090",),
        "NVIDIA Ada Lovelace whitepaper (BF16 with FP32 accumulate)", f"{TORCH_LOG}: total_memory=24563MB"),
    row("RTX-3090", "ampere", 24268, (71, 35.6, 35.6), ("RTX 3090",),
        "NVIDIA Ampere GA102 whitepaper (BF16 with FP32 accumulate)", f"{TORCH_LOG}: total_memory=24268MB"),
    row("V100-32GB", "volta", 32510, (125, None, 15.7), ("V100-SXM2-32GB", "V100-PCIE-32GB", "V100 32GB"),
        "NVIDIA V100 data sheet, SXM2 (FP16: no BF16 or TF32 tensor cores)",
        f"{TORCH_LOG}: V100-PCIE-32GB total_memory=32510MB", bf16=False),
    row("V100-16GB", "volta", 16160, (125, None, 15.7), ("V100",),
        "NVIDIA V100 data sheet, SXM2 (FP16: no BF16 or TF32 tensor cores)",
        f"{TORCH_LOG}: V100-SXM2-16GB total_memory=16160MB", bf16=False, aliases=("V100",)),
    row("T4", "turing", 15095, (65, None, 8.1), ("Tesla T4", "T4"), "NVIDIA T4 data sheet (FP16: no BF16 or TF32)",
        f"{TORCH_LOG}: total_memory=15095MB", bf16=False),
)

# The CUDA context of a training process, which torch's allocator does not count: the driver and the
# kernels loaded. PyTorch's maintainers measure 300-400 MB right after the first CUDA call with lazy module
# loading (pytorch/pytorch #107667, #109888); a training run then loads cuBLAS, cuDNN and attention kernels,
# more of them on newer generations. Assumed, not measured here: a GPU machine measures it
# (docs/planning.md, "left for a GPU").
CUDA_CONTEXT_MIB = {"volta": 400, "turing": 400, "ampere": 500, "ada": 500, "hopper": 600, "blackwell": 700}
CUDA_CONTEXT_DEFAULT_MIB = 600  # a GPU not in the table


def cuda_context_bytes(gpu: Optional[Gpu]) -> int:
    return (CUDA_CONTEXT_MIB[gpu.generation] if gpu else CUDA_CONTEXT_DEFAULT_MIB) * MiB


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


def parse_memory(text: str) -> int:
    """`80GiB`, `80 GB`, `81920MiB`, `8e10` → bytes (GB is 10^9, GiB 2^30)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in MEMORY_UNITS or float(match.group(1)) <= 0:
        raise GptError(f'--gpu-memory must be a size such as 80GiB, 24GB or 81920MiB, not "{text}".')
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])
