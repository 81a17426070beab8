"""Model states: what DeepSpeed holds per GPU for the weights, gradients and optimizer, by ZeRO stage and by
phase of a step, following DeepSpeed 0.19's code (docs/planning.md has the table).

P parameters held, N data-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelConfig
from ..optimizers import ADAMW, OptimizerSpec, Placement
from .activations import FP32, ActivationEstimate
from .counts import parameter_tensors
from .gpus import Gpu

# Mixed-precision Adam keeps 16 bytes per parameter (Rajbhandari et al. 2020, ZeRO, section 3.1):
# 2 (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master weights 4, and the optimizer's own state: Adam's
# momentum and variance, 8 = ADAMW.state_bytes).
WEIGHT_BYTES, GRAD_BYTES, MASTER_BYTES = 2, 2, FP32


def optimizer_bytes(optimizer: OptimizerSpec) -> int:
    """Bytes per parameter of what the optimizer holds under mixed precision: the fp32 master weights and
    the optimizer's own state (AdamW: 4 + 8 = 12)."""
    return MASTER_BYTES + optimizer.state_bytes


def zero_memory_per_gpu(parameters: int, gpus: int, optimizer: OptimizerSpec = ADAMW) -> dict[str, int]:
    """The textbook model-state bytes per GPU for ZeRO stages 0-3 across `gpus` data-parallel ranks (the
    paper's 16 bytes per parameter with AdamW; what DeepSpeed really holds for gptcli's config is
    state_layout's)."""
    p, g, o = parameters, gpus, optimizer_bytes(optimizer)
    return {
        "zero0": p * (WEIGHT_BYTES + GRAD_BYTES + o),
        "zero1": p * (WEIGHT_BYTES + GRAD_BYTES) + p * o // g,
        "zero2": p * WEIGHT_BYTES + p * (GRAD_BYTES + o) // g,
        "zero3": p * (WEIGHT_BYTES + GRAD_BYTES + o) // g,
    }

# --- model states and DeepSpeed's buffers ------------------------------------------------------------------------

# DeepSpeed 0.19's defaults for the zero_optimization keys that size its buffers
# (deepspeed/runtime/zero/config.py); [deepspeed] config = { zero_optimization = { ... } } overrides them.
ZERO_BUFFER_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                        "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
                        "stage3_param_persistence_threshold": 100_000, "overlap_comm": None}
# ZeRO-0 and bf16 ZeRO-1 all-reduce the gradients in flattened copies of up to this many elements
# (deepspeed/runtime/engine.py, MEMORY_OPT_ALLREDUCE_SIZE; not configurable).
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
# Gradient norms are taken per tensor in fp64 (deepspeed/runtime/zero/utils.py, get_norm_dtype).
NORM_BYTES = 8

PHASES = ("forward and the loss's backward", "lm_head's backward", "backward through the blocks", "gradient reduction",
          "optimizer step")


@dataclass(frozen=True)
class Training:
    """Everything besides the micro batch that decides memory per GPU: the model as trained, its precision,
    how DeepSpeed holds it, on how many ranks."""

    model: ModelConfig  # as trained: the vocabulary padded on a GPU (training_model)
    seq_len: int
    ranks: int
    precision: str  # fp32 | bf16 | fp16
    zero_stage: int
    device: str = "cuda"
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: bool = False
    zero: dict = field(default_factory=dict)  # [deepspeed] config's zero_optimization table
    optimizer: OptimizerSpec = ADAMW  # train.optimizer's spec: its state bytes and its step's temporaries
    gpu: Optional[Gpu] = None  # the GPU model, when known: its CUDA context and NCCL's buffers (plan.allowances)

    @property
    def weight_bytes(self) -> int:
        return FP32 if self.precision == "fp32" else 2

    @property
    def optimizer_bytes(self) -> int:
        """Per parameter the optimizer updates: its own state, and the fp32 masters DeepSpeed keeps beside
        it (all but fp32 at ZeRO-0, where the optimizer updates the module's fp32 weights themselves)."""
        if self.zero_stage == 0 and self.precision == "fp32":
            return self.optimizer.state_bytes
        return optimizer_bytes(self.optimizer)

    def zero_setting(self, key: str):
        value = self.zero.get(key, ZERO_BUFFER_DEFAULTS[key])
        if key == "overlap_comm" and value is None:
            return self.zero_stage == 3  # DeepSpeed's dynamic default
        return value


@dataclass
class PhaseMemory:
    """Bytes per GPU alive during one phase of a step, by what they are."""

    phase: str
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class StateLayout:
    """What DeepSpeed holds per GPU, by when: `resident` always; `working` while the model runs (ZeRO-3's
    gathered parameters); `accumulated` from one micro batch to the next when gradients accumulate;
    `backward` once the blocks' gradients flow; `reduction` after the backward pass; `step` in the step."""

    resident: dict[str, int]
    backward: dict[str, int]
    reduction: dict[str, int]
    step: dict[str, int]
    accumulated: dict[str, int] = field(default_factory=dict)
    working: dict[str, int] = field(default_factory=dict)
    step_norms: int = 0  # fp64 norm of the largest gradient, taken before the step's other temporaries


def state_layout(training: Training) -> StateLayout:
    """Each layout follows DeepSpeed 0.19's code for the optimizer wrapper gptcli's config selects
    (engine._do_optimizer_sanity_check); tests/test_planner.py measures them on the CPU and
    docs/planning.md has the table."""
    stage = training.zero_stage
    if stage == 0:
        layout = stage0_layout(training)
    elif stage == 3:
        layout = stage3_layout(training)
    elif training.precision == "bf16" and stage == 1 and not training.offload_optimizer:
        layout = bf16_stage1_layout(training)
    else:
        layout = zero_optimizer_layout(training)
    temporaries = training.optimizer.step_temporary_bytes(Placement(training.device, training.offload_optimizer))
    if temporaries:  # e.g. torch's single-tensor AdamW on the CPU (optimizers.adamw_temporaries)
        # ZeRO-0 updates each parameter tensor, ZeRO 1-3 this rank's flat partition.
        updated = largest_tensor(training) if stage == 0 else partition(training)
        layout.step = merge(layout.step, {"temporaries": temporaries * updated})
    return layout


def model_state_phases(training: Training, activations: Optional[ActivationEstimate] = None,
                       grad_accum_steps: int = 1) -> list[PhaseMemory]:
    """The bytes per GPU of each phase of a step: DeepSpeed's (state_layout) plus the activations. They
    peak in the loss's backward, before any parameter gradient exists unless gradients accumulate; then
    lm_head's backward produces the first parameter gradient (ZeRO-2 allocates its bucket there, while all
    activations and the logits' gradient are alive); the blocks' backward holds fewer activations but the
    gradients and buckets."""
    layout = state_layout(training)
    held = merge(layout.working, layout.accumulated if grad_accum_steps > 1 else {})
    buffers = {k: v for k, v in layout.backward.items() if k == "communication buffers"}
    extras = [merge(held, {"activations": activations.at_loss if activations else 0}),
              merge(held, buffers, {"activations": activations.at_head if activations else 0}),
              merge(layout.working, layout.backward, {"activations": activations.in_blocks if activations else 0}),
              layout.reduction,
              merge(layout.step, {"temporaries": max(0, layout.step_norms - layout.step.get("temporaries", 0))})]
    return [PhaseMemory(name, merge(layout.resident, extra)) for name, extra in zip(PHASES, extras, strict=True)]


def merge(*parts: dict[str, int]) -> dict[str, int]:
    """Terms of the same name add up; zero terms are left out."""
    merged: dict[str, int] = {}
    for part in parts:
        for term, size in part.items():
            merged[term] = merged.get(term, 0) + size
    return {term: size for term, size in merged.items() if size}


def held_parameters(training: Training) -> int:
    return sum(parameter_tensors(training.model).values())


def partition(training: Training) -> int:
    """Elements of one rank's share of the flat parameters (ZeRO 1-3)."""
    return -(-held_parameters(training) // training.ranks)


def largest_tensor(training: Training) -> int:
    return max(parameter_tensors(training.model).values())


def stage0_layout(training: Training) -> StateLayout:
    """ZeRO-0. fp32: the optimizer alone (weights, gradients, its state: AdamW's 8 bytes of moments).
    bf16/fp16: DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py): 16-bit weights and
    gradients, fp32 masters and the optimizer's state; its step first copies every gradient to fp32. After the backward pass the engine
    all-reduces the gradients through a flattened copy (engine.allreduce_bucket)."""
    P, w = held_parameters(training), training.weight_bytes
    gradients = {"gradients": w * P}
    step = {**gradients, **({"temporaries": FP32 * P} if w != FP32 else {})}  # fp32 copies of the gradients
    return StateLayout(resident={"weights": w * P, "optimizer states": training.optimizer_bytes * P},
                       backward=gradients, accumulated=gradients, step=step,
                       reduction={**gradients, "communication buffers": w * min(P, ALLREDUCE_BUCKET_ELEMENTS)})


def bf16_stage1_layout(training: Training) -> StateLayout:
    """bf16 at ZeRO-1 with fp32 gradient accumulation is DeepSpeed's BF16_Optimizer (runtime/bf16_optimizer.py):
    bf16 weights and gradients, a full fp32 gradient buffer (not partitioned), the fp32 master and moments
    partitioned. The engine all-reduces the fp32 buffers through a flattened copy, sent as bf16."""
    P, Pn = held_parameters(training), partition(training)
    gradients = {"gradients": 2 * P}
    flat = min(P, ALLREDUCE_BUCKET_ELEMENTS)
    return StateLayout(resident={"weights": 2 * P, "gradients": FP32 * P, "optimizer states": training.optimizer_bytes * Pn},
                       backward=gradients, accumulated=gradients, step=gradients,
                       reduction={**gradients, "communication buffers": (FP32 + 2) * flat})


def zero_optimizer_layout(training: Training) -> StateLayout:
    """ZeRO 1-2 through DeepSpeedZeroOptimizer (runtime/zero/stage_1_and_2.py): 16-bit (or fp32) weights
    whole, fp32 master and moments partitioned. Gradients are copied into a bucket of reduce_bucket_size
    elements (two with overlap_comm) and reduced into this rank's partition: at ZeRO-2 as the backward pass
    produces them, at ZeRO-1 after it, when the full gradients exist. bf16 keeps the partition in fp32
    (gptcli's grad_accum_dtype) and flattens each bucket to reduce it; fp32 and fp16 flatten the partition
    in the step instead. The step first takes an fp64 norm of each gradient."""
    P, Pn, w, stage = held_parameters(training), partition(training), training.weight_bytes, training.zero_stage
    separate_fp32 = training.precision == "bf16"  # an fp32 gradient partition beside 16-bit gradients
    partition_bytes = 0 if training.offload_optimizer else (FP32 if separate_fp32 else w) * Pn
    bucket = w * training.zero_setting("reduce_bucket_size") * (2 if training.zero_setting("overlap_comm") else 1)
    flatten = w * min(training.zero_setting("reduce_bucket_size"), P) if separate_fp32 else 0
    resident = {"weights": w * P, "optimizer states": 0 if training.offload_optimizer else training.optimizer_bytes * Pn}
    grad_partition = {"gradients": partition_bytes}
    if stage == 1:
        full = {"gradients": w * P}
        backward, accumulated = full, full
        reduction = merge(full, grad_partition, {"communication buffers": bucket + flatten})
    else:
        backward = merge(grad_partition, {"communication buffers": bucket + flatten})
        accumulated, reduction = grad_partition, grad_partition
    step, norms = dict(grad_partition), 0
    if not training.offload_optimizer:
        step["temporaries"] = 0 if separate_fp32 else w * Pn + (FP32 * Pn if w != FP32 else 0)
        norms = NORM_BYTES * min(largest_tensor(training), Pn)
    return StateLayout(resident=resident, backward=backward, accumulated=accumulated, reduction=reduction,
                       step=step, step_norms=norms)


def stage3_layout(training: Training) -> StateLayout:
    """ZeRO-3 (runtime/zero/stage3.py, partition_parameters.py): weights, fp32 gradients, master and moments
    all partitioned; parameters under stage3_param_persistence_threshold elements stay whole on every rank.
    The reduce bucket is allocated once and stays. While a layer runs its parameters are gathered: at most
    the prefetch bucket plus the layer itself (capped by max_live_parameters), none on one rank."""
    tensors = parameter_tensors(training.model)
    P, Pn, w, N = sum(tensors.values()), partition(training), training.weight_bytes, training.ranks
    persistent = sum(n for n in tensors.values() if n <= training.zero_setting("stage3_param_persistence_threshold"))
    weights = w * (Pn + persistent * (N - 1) // N)
    gathered = 0
    if N > 1:
        live = training.zero_setting("stage3_prefetch_bucket_size") + largest_layer(training)
        gathered = w * min(live, training.zero_setting("stage3_max_live_parameters"))
    offloaded = training.offload_optimizer
    resident = {"weights": 0 if training.offload_params else weights, "gradients": 0 if offloaded else FP32 * Pn,
                "optimizer states": 0 if offloaded else training.optimizer_bytes * Pn,
                "communication buffers": w * training.zero_setting("reduce_bucket_size")}
    flatten = {"communication buffers": w * min(training.zero_setting("reduce_bucket_size"), P)}
    step = {} if offloaded else {"temporaries": FP32 * Pn}  # the partition's gradients flattened
    return StateLayout(resident=resident, working={"weights": gathered}, backward=flatten, reduction={},
                       step=step, step_norms=0 if offloaded else NORM_BYTES * min(largest_tensor(training), Pn))


def largest_layer(training: Training) -> int:
    """Parameters of the largest module (its own, not its children's), as DeepSpeed's ZeRO-3 estimator
    counts a layer: the embedding, or one Linear with its bias."""
    layers: dict[str, int] = {}
    for name, size in parameter_tensors(training.model).items():
        module = name.rsplit(".", 1)[0]
        layers[module] = layers.get(module, 0) + size
    return max(layers.values())
