"""Will it fit, and how long will it take: the memory per GPU and the time of a training run, worked out
from the project before anything is built.

Everything here is arithmetic on the configuration: no torch and no DeepSpeed import, so `gpt inspect-params`
and `gpt train`'s pre-flight answer in a fraction of a second, and both ask this one module. Each term, its
formula and how well it agrees with what PyTorch and DeepSpeed really hold is in docs/planning.md;
tests/test_planner.py measures the activations autograd keeps, and DeepSpeed's buffers on the CPU.

Shapes: B micro batch (sequences per rank), T tokens per sequence, C = n_embd, H heads, D = C / H,
r = mlp_ratio, V vocabulary (Vp padded), L layers, P parameters held, N data-parallel ranks, b bytes of one
activation value (2 in bf16/fp16, 4 in fp32).

The package, by the order a plan is worked out: activations.py (what a micro batch keeps), counts.py
(parameters and FLOPs), states.py (what DeepSpeed holds, by ZeRO stage and phase), gpus.py (the GPU table),
plan.py (the run, its memory at a micro batch, what fits, the time), measured.py (what a run measured of
itself, and the plan beside it), words.py (the plan in words).
"""

from .activations import (
    FP32,
    LOSS_CHUNK_VALUES,
    ActivationEstimate,
    ActivationShape,
    activation_memory,
    loss_rows_per_chunk,
)
from .counts import flops_per_token, parameter_components, parameter_tensors
from .gpus import GPUS, GiB, Gpu, cuda_context_bytes, find_gpu, gpu_for_device_name, gpu_names, parse_memory
from .measured import Comparison, Measurement, PlanAgainstMeasured, plan_against_measured, read_measurement
from .plan import (
    CPU_PROCESS_BYTES,
    CPU_TRAINING_EFFICIENCY,
    FRAGMENTATION,
    NCCL_GROUP_BYTES,
    OP_BUILD_SECONDS,
    STARTUP_SECONDS,
    WORKSPACE_BYTES,
    Allowance,
    MemoryPlan,
    RunPlan,
    activation_shape,
    fitting_change,
    largest_micro_batch,
    memory_plan,
    mfu_for,
    model_name,
    plan_run,
    precision_for,
    preset_model,
    training_for,
    training_model,
)
from .states import (
    Training,
    held_parameters,
    largest_layer,
    model_state_phases,
    partition,
    state_layout,
    zero_memory_per_gpu,
)
from .words import allowance_line, gib, human_count, human_duration, memory_line, model_state_title, plan_summary

__all__ = ["FP32", "LOSS_CHUNK_VALUES", "ActivationEstimate", "ActivationShape", "activation_memory",
           "loss_rows_per_chunk", "flops_per_token", "parameter_components", "parameter_tensors", "GPUS", "GiB",
           "Gpu", "cuda_context_bytes", "find_gpu", "gpu_for_device_name", "gpu_names", "parse_memory",
           "CPU_PROCESS_BYTES", "CPU_TRAINING_EFFICIENCY", "FRAGMENTATION", "NCCL_GROUP_BYTES", "OP_BUILD_SECONDS",
           "STARTUP_SECONDS", "WORKSPACE_BYTES", "Allowance", "MemoryPlan", "RunPlan", "activation_shape",
           "fitting_change", "largest_micro_batch", "memory_plan", "mfu_for",
           "model_name", "plan_run", "precision_for", "preset_model", "training_for", "training_model", "Training",
           "held_parameters", "largest_layer", "model_state_phases", "partition", "state_layout",
           "zero_memory_per_gpu", "gib", "human_count", "human_duration", "memory_line", "model_state_title",
           "plan_summary", "allowance_line", "Comparison", "Measurement", "PlanAgainstMeasured",
           "plan_against_measured", "read_measurement"]
