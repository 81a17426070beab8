"""The planner's GPU table (planner/gpus.py) against docs/planning.md's: the memory torch reports on each GPU
and its dense peaks per precision are the documented values, and a few are held to their published sources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gptcli import planner
from gptcli.planner.gpus import GPUS, GiB, MiB

PLANNING = Path(__file__).resolve().parents[1] / "docs" / "planning.md"


def documented_rows() -> dict[str, list[str]]:
    """The GPU table of docs/planning.md: `--gpu` name → its cells."""
    text = PLANNING.read_text()
    table = text[text.index("| `--gpu` | generation |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[re.match(r"`([^`]+)`", cells[0]).group(1)] = cells
    return rows


def tflops(cell: str) -> float | None:
    return None if cell == "—" else float(cell.split()[0])


def test_every_gpu_of_the_table_is_documented_with_its_memory_peaks_and_sources():
    rows = documented_rows()
    assert list(rows) == planner.gpu_names()
    for gpu in GPUS:
        _, generation, memory, _, bf16, tf32, fp32, memory_source, source = rows[gpu.name]
        assert generation == gpu.generation, gpu.name
        assert memory == f"{gpu.memory / GiB:.2f} GiB", gpu.name
        assert (tflops(bf16), tflops(tf32), tflops(fp32)) == (
            gpu.peak_16bit / 1e12, gpu.peak_tf32 / 1e12 if gpu.peak_tf32 else None, gpu.peak_fp32 / 1e12), gpu.name
        assert bf16.endswith("(fp16)") == (not gpu.bf16), gpu.name
        assert (memory_source, source) == (gpu.memory_source, gpu.source), gpu.name


@pytest.mark.parametrize("name, mib, peaks", [
    ("H100-SXM", 81089, (989, 495, 67)),  # torch: total_memory=81089MB (79.2 GiB, not the data sheet's 80 GB)
    ("A100-40GB", 40536, (312, 156, 19.5)),  # torch: 39.6 GiB
    ("A100-80GB", 81251, (312, 156, 19.5)),  # deviceQuery: 81251 MBytes
    ("L40S", 45589, (362, 183, 91.6)),
    ("T4", 15095, (65, None, 8.1)),  # torch: 14.7 GiB; no bf16, no TF32
    ("V100-16GB", 16160, (125, None, 15.7)),  # 15.78 GiB, as nanoGPT's out-of-memory report prints it
])
def test_the_memory_is_what_torch_reports_and_the_peaks_the_data_sheets(name, mib, peaks):
    gpu = planner.find_gpu(name)
    assert gpu.memory == mib * MiB
    assert (gpu.peak_16bit, gpu.peak_tf32, gpu.peak_fp32) == tuple(p * 1e12 if p else None for p in peaks)


def test_a_run_at_each_precision_plans_at_that_precisions_peak():
    """bf16 and fp16 on the 16-bit tensor cores; fp32 on TF32 where there is TF32 (gptcli turns it on), else
    on FP32 cores; bf16 on a GPU without bf16 tensor cores is no faster than fp32."""
    h100, t4 = planner.find_gpu("H100"), planner.find_gpu("T4")
    assert [h100.peak_for(p) / 1e12 for p in ("bf16", "fp16", "fp32")] == [989, 989, 495]
    assert [t4.peak_for(p) / 1e12 for p in ("bf16", "fp16", "fp32")] == [8.1, 65, 8.1]


def test_a_t4_plans_fp32_as_its_own_run_does_and_gpu_memory_alone_takes_the_precision_asked():
    """`--gpu T4` plans fp32 ("auto" without bf16); `--gpu-memory` of the same card alone plans bf16 unless
    `--precision` says otherwise, and then plans the same micro batch as the T4 (its CUDA context aside)."""
    from gptcli.inspect import PlanRequest, inspect_command

    t4 = inspect_command("gpt2", None, [], request=PlanRequest(gpu="T4")).plan
    bare = inspect_command("gpt2", None, [], request=PlanRequest(gpu_memory="15095MiB")).plan
    fp32 = inspect_command("gpt2", None, [], request=PlanRequest(gpu_memory="15095MiB", precision="fp32")).plan
    assert (t4.training.precision, bare.training.precision, fp32.training.precision) == ("fp32", "bf16", "fp32")
    assert bare.largest[False] > 1.5 * t4.largest[False]  # bf16 halves the activations
    assert abs(fp32.largest[False] - t4.largest[False]) <= 1
