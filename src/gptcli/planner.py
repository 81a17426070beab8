"""Will it fit, and how long will it take: the memory per GPU and the time of a training run, worked out
from the project before anything is built.

Everything here is arithmetic on the configuration: no torch and no DeepSpeed import, so `gpt inspect-params`
and `gpt train`'s pre-flight answer in a fraction of a second, and both ask this one module. Each term, its
formula and how well it agrees with what PyTorch and DeepSpeed really hold is in docs/planning.md;
tests/test_planner.py measures the activations autograd keeps, and DeepSpeed's buffers on the CPU.

Shapes: B micro batch (sequences per rank), T tokens per sequence, C = n_embd, H heads, D = C / H,
r = mlp_ratio, V vocabulary (Vp padded), L layers, P parameters held, N data-parallel ranks, b bytes of one
activation value (2 in bf16/fp16, 4 in fp32).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from .config import ModelConfig, Project
from .errors import GptError

FP32 = 4  # bytes
INDEX = 8  # bytes of an int64 token id or position


# --- activations ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationShape:
    """How one micro batch runs: the shape, the precision the model is held in, and the code path."""

    batch: int
    seq_len: int
    dtype_bytes: int  # 2: bf16/fp16 (the model as DeepSpeed holds it), 4: fp32
    device: str  # "cuda" or "cpu": the kernels differ in what they keep (see attention_kernel)
    dropout: float = 0.0
    checkpointing: bool = False
    custom_mask: bool = False  # a materialised (1, 1, T, T) mask: model.attention other than "causal"


def attention_kernel(config: ModelConfig, shape: ActivationShape) -> str:
    """The kernel scaled_dot_product_attention picks, which decides what it keeps for the backward pass:
    "flash" (q, k, v, the output, a logsumexp per row: no T×T scores), "efficient" (the same plus the mask as
    an additive bias) or "math" (the T×T probabilities, in fp32). On CUDA, flash needs bf16/fp16 and no mask;
    the memory-efficient kernel takes fp32, masks and dropout; both need a head size divisible by 8. On the
    CPU the flash kernel takes masks but not dropout (measured with torch 2.13: dropout falls back to math)."""
    if shape.device == "cpu":
        return "math" if shape.dropout > 0 else "flash"
    if config.head_dim % 8:
        return "math"
    if shape.custom_mask or shape.dtype_bytes == FP32:
        return "efficient"
    return "flash"


def dropout_mask_bytes(shape: ActivationShape) -> int:
    """Bytes per element of a kept dropout mask: CUDA's fused dropout keeps a bool mask; on the CPU,
    dropout multiplies by a scaled noise tensor of the input's dtype, which is what is kept."""
    return 1 if shape.device == "cuda" else shape.dtype_bytes


def norm_stat_bytes(shape: ActivationShape) -> int:
    """LayerNorm keeps a mean and a reciprocal std per row: fp32 on CUDA, the input's dtype on the CPU."""
    return FP32 if shape.device == "cuda" else shape.dtype_bytes


@dataclass
class ActivationEstimate:
    """Bytes of activations for one micro batch on one rank.

    `kept` is what autograd holds between the forward and the backward pass (what tests measure with
    saved_tensors_hooks). `peak` adds the largest transient of the backward pass on top: the logits' gradient,
    or one block's gradients, or, with checkpointing, the block being recomputed."""

    terms: dict[str, int]  # kept, by part: "blocks", "embeddings", "final norm and head", "loss", ...
    per_layer: int  # kept by one block when it is not checkpointed
    transients: dict[str, int]  # the candidates for the backward peak, on top of what is kept then
    kept: int = 0
    peak: int = 0

    def __post_init__(self):
        self.kept = sum(self.terms.values())
        self.peak = max(self.at_loss, self.at_head, self.in_blocks)

    @property
    def at_loss(self) -> int:
        """The most alive up to the end of the loss's backward pass (every block's activations are kept)."""
        return self.kept + max(self.transients["loss backward"], self.transients["loss forward"])

    @property
    def at_head(self) -> int:
        """In lm_head's backward: the blocks' activations, the logits' gradient and lm_head's weight gradient
        (what the loss kept is released once its own backward has run)."""
        return self.kept - self.terms["loss"] + self.transients["head backward"]

    @property
    def in_blocks(self) -> int:
        """The most alive in the blocks' backward pass: the loss's part is gone, one block's gradients added."""
        return self.kept - self.terms["loss"] + self.transients["block backward"]


def block_activation_bytes(config: ModelConfig, shape: ActivationShape) -> int:
    """What one transformer block keeps for its backward pass. In units of BTC·b (Korthikanti et al. 2022
    count 34 bytes per token·channel in 16-bit for this block with dropout, plus 5·H·T/C for the scores):
    the block input and the normed input (2), q, k, v as one tensor (3), the attention output = c_proj's
    input (1), the second residual and its norm (2), the MLP's hidden state before and after the activation
    (2r, or r for ReLU, which keeps only its output, also c_proj's input). Then the kernel's own, the masks
    and the LayerNorm statistics."""
    B, T, H = shape.batch, shape.seq_len, config.n_head
    b, btc = shape.dtype_bytes, shape.batch * shape.seq_len * config.n_embd
    hidden = config.mlp_ratio * (1 if config.activation == "relu" else 2)
    kernel = attention_kernel(config, shape)
    total = btc * b * (2 + 1 + 2 + hidden)
    if kernel == "math":
        total += attention_math_bytes(config, shape)
    else:
        total += 3 * btc * b + B * H * lse_rows(T, kernel) * FP32  # q, k, v; logsumexp per row
        if shape.custom_mask:
            total += T * mask_columns(T, kernel) * b  # the bool mask as an additive bias, per layer
    if config.position == "rotary" and kernel != "math":
        # The rotated q and k are new tensors the kernel keeps; its output then follows q's (B, H, T, D)
        # layout, so c_proj's input is a copy rather than the same storage. (apply_rotary's fp32 products
        # keep only the cos/sin tables, shared by all layers.)
        total += 3 * btc * b
    if shape.dropout > 0:
        total += 2 * btc * dropout_mask_bytes(shape)  # after attn.c_proj and mlp.c_proj
    total += 2 * 2 * B * T * norm_stat_bytes(shape)  # ln_1, ln_2: mean and rstd per row
    return total


def lse_rows(seq_len: int, kernel: str) -> int:
    """The logsumexp the flash kernels keep: one fp32 per query row (memory-efficient: rows rounded up to 32)."""
    return -(-seq_len // 32) * 32 if kernel == "efficient" else seq_len


def mask_columns(seq_len: int, kernel: str) -> int:
    """Key columns of the bias the memory-efficient kernel keeps: rounded up to a multiple of 16 (alignment)."""
    return -(-seq_len // 16) * 16 if kernel == "efficient" else seq_len


def attention_math_bytes(config: ModelConfig, shape: ActivationShape) -> int:
    """SDPA's math path upcasts q, k, v to fp32 (torch's default, allow_fp16_bf16_reduction_math_sdp off) and
    keeps the T×T probabilities in fp32, and with dropout the mask and the dropped probabilities too
    (Korthikanti's 5·a·s/h term, here in fp32)."""
    B, T, H = shape.batch, shape.seq_len, config.n_head
    btc = B * T * config.n_embd
    scores = B * H * T * T
    # The dropout inside runs on the fp32 probabilities: a bool mask on CUDA, fp32 noise on the CPU.
    mask = 1 if shape.device == "cuda" else FP32
    per_score = FP32 + (mask + FP32 if shape.dropout > 0 else 0)
    qkv = 3 * btc * FP32
    if shape.dtype_bytes == FP32 and B == 1:
        qkv += 2 * btc * FP32  # v (1, H, T, D) reshapes as a view, keeping all of c_attn's output alive
    return qkv + scores * per_score


# Rows of fp32 log-probabilities the loss holds at once (model.LOSS_CHUNK_VALUES; equal by a test).
LOSS_CHUNK_VALUES = 2**26


def loss_rows_per_chunk(vocab_size: int) -> int:
    return max(1, LOSS_CHUNK_VALUES // vocab_size)


def loss_terms(config: ModelConfig, shape: ActivationShape) -> tuple[int, int, int]:
    """(kept, forward transient, backward transient) of the head's logits and chunked_cross_entropy.

    Up to LOSS_CHUNK_VALUES values it is F.cross_entropy on fp32 logits, which keeps the N×V fp32
    log-probabilities. Above, each chunk is checkpointed: only the logits in the model's dtype are kept, and
    the backward pass recomputes one chunk's fp32 softmax at a time, while the logits' gradient is built up
    (each chunk's slice gradient is a full-size tensor added into it)."""
    N, V, Vp, b = shape.batch * shape.seq_len, config.vocab_size, config.padded_vocab_size, shape.dtype_bytes
    rows = loss_rows_per_chunk(V)
    if N <= rows:
        padded_logits = N * Vp * b if Vp != V else 0  # lm_head's output before the padding columns are cut
        copy = N * V * FP32 if (b != FP32 or Vp != V) else 0  # logits.float()
        kept = N * V * FP32
        # The backward pass holds the loss's gradient and log_softmax's, both N×V in fp32.
        return kept, padded_logits + copy + N * V * b, 2 * N * V * FP32
    # The chunks are views of lm_head's output (cutting the padding columns and flattening is a view),
    # so the whole padded output is what stays alive.
    # In the backward pass the logits' gradient (N×V) is built up while one chunk's fp32 softmax is
    # recomputed (three chunk-sized fp32 tensors at once); from three chunks on, adding a chunk's
    # full-size slice gradient into the sum holds three N×V tensors at once (both measured on the CPU).
    chunk = rows * V
    kept = N * Vp * b
    chunks = -(-N // rows)
    backward = max(N * V * b + 3 * chunk * FP32, (3 if chunks >= 3 else 2) * N * V * b)
    return kept, chunk * 2 * FP32, backward


def activation_memory(config: ModelConfig, shape: ActivationShape) -> ActivationEstimate:
    """The activations of one micro batch of `config` (the model as trained: padded vocabulary included)."""
    B, T, C, b = shape.batch, shape.seq_len, config.n_embd, shape.dtype_bytes
    btc = B * T * C
    per_layer = block_activation_bytes(config, shape)
    if shape.checkpointing:
        # Each block keeps its input only (torch.utils.checkpoint, non-reentrant); the mask and the rotary
        # tables are shared by all blocks, kept once.
        blocks = config.n_layer * btc * b
        shared = (T * T if shape.custom_mask else 0)
    else:
        blocks, shared = config.n_layer * per_layer, 0
    embeddings = B * T * INDEX + (T * INDEX if config.position == "learned" else 0)  # token ids, positions
    if shape.dropout > 0:
        embeddings += btc * dropout_mask_bytes(shape)
    if config.position == "rotary":
        shared += 2 * B * T * (config.head_dim // 2) * FP32  # cos and sin, computed once per forward
    head = btc * b  # lm_head's input
    if config.final_norm:
        head += btc * b + 2 * B * T * norm_stat_bytes(shape)  # ln_f's input and statistics
    kept_loss, loss_forward, loss_backward = loss_terms(config, shape)
    terms = {"blocks": blocks, "shared by the blocks": shared, "embeddings": embeddings,
             "final norm and head": head, "loss": kept_loss + B * T * INDEX}  # + the targets
    # With checkpointing, the block being recomputed holds its activations again while its backward runs.
    block_backward = per_layer if shape.checkpointing else block_backward_bytes(config, shape)
    head_backward = B * T * config.padded_vocab_size * b + config.padded_vocab_size * C * b
    return ActivationEstimate(terms=terms, per_layer=per_layer,
                              transients={"loss forward": loss_forward, "loss backward": loss_backward,
                                          "head backward": head_backward, "block backward": block_backward})


def block_backward_bytes(config: ModelConfig, shape: ActivationShape) -> int:
    """The gradients a block's backward pass adds at its widest: the residual stream's and the MLP hidden
    state's (each kept tensor is freed once its own backward has run, which makes room for the next
    gradient: (r + 1)·BTC·b, measured on the CPU)."""
    btc = shape.batch * shape.seq_len * config.n_embd
    return btc * shape.dtype_bytes * (config.mlp_ratio + 1)


# --- parameters and FLOPs -----------------------------------------------------------------------------------------


def parameter_tensors(config: ModelConfig) -> dict[str, int]:
    """Every parameter tensor of the GPT that model.py builds, by its state-dict name: elements as held
    (vocabulary padding rows included; the tied lm_head is wte itself, so it is not listed)."""
    C, hidden, Vp = config.n_embd, config.mlp_ratio * config.n_embd, config.padded_vocab_size
    tensors = {"wte.weight": Vp * C}
    if config.position == "learned":
        tensors["wpe.weight"] = config.block_size * C
    linears = (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, hidden), ("mlp.c_proj", hidden, C))
    for layer in range(config.n_layer):
        for norm in ("ln_1", "ln_2"):
            tensors.update(norm_tensors(f"h.{layer}.{norm}", config))
        for name, inputs, outputs in linears:
            tensors[f"h.{layer}.{name}.weight"] = inputs * outputs
            if config.bias:
                tensors[f"h.{layer}.{name}.bias"] = outputs
    if config.final_norm:
        tensors.update(norm_tensors("ln_f", config))
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = Vp * C
    return tensors


def norm_tensors(prefix: str, config: ModelConfig) -> dict[str, int]:
    return {f"{prefix}.weight": config.n_embd, **({f"{prefix}.bias": config.n_embd} if config.bias else {})}


def parameter_components(config: ModelConfig) -> dict[str, int]:
    """The counts `gpt inspect-params` reports (model.parameter_components of the built model, equal by a
    test): vocabulary padding left out, the tied lm_head counted once, as wte."""
    C, L, hidden = config.n_embd, config.n_layer, config.mlp_ratio * config.n_embd
    bias = int(config.bias)
    norm = C * (1 + bias)
    return {
        "wte (token embedding)": config.vocab_size * C,
        "wpe (position embedding)": config.block_size * C if config.position == "learned" else 0,
        "attention (all blocks)": L * (C * 3 * C + 3 * C * bias + C * C + C * bias),
        "mlp (all blocks)": L * (C * hidden + hidden * bias + hidden * C + C * bias),
        "layernorms (all blocks)": L * 2 * norm,
        "ln_f (final norm)": norm if config.final_norm else 0,
        "lm_head": 0 if config.tie_embeddings else config.vocab_size * C,
    }


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls of forward+backward (Kaplan et al. 2020) plus
    12·L·H·D·T for attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). N is every
    parameter but the position embedding (a lookup, not a matmul), the tied wte/lm_head counted once."""
    components = parameter_components(config)
    matmul_parameters = sum(components.values()) - components["wpe (position embedding)"]
    return 6 * matmul_parameters + 12 * config.n_layer * config.n_head * config.head_dim * seq_len



# Mixed-precision Adam keeps 16 bytes per parameter (Rajbhandari et al. 2020, ZeRO, section 3.1):
# 2 (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master weights, momentum, variance).
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12


def zero_memory_per_gpu(parameters: int, gpus: int) -> dict[str, int]:
    """The textbook model-state bytes per GPU for ZeRO stages 0-3 across `gpus` data-parallel ranks (the
    paper's 16 bytes per parameter; what DeepSpeed really holds for gptcli's config is state_layout's)."""
    p, g = parameters, gpus
    return {
        "zero0": p * (WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES),
        "zero1": p * (WEIGHT_BYTES + GRAD_BYTES) + p * OPTIMIZER_BYTES // g,
        "zero2": p * WEIGHT_BYTES + p * (GRAD_BYTES + OPTIMIZER_BYTES) // g,
        "zero3": p * (WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) // g,
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
# The optimizer step's own temporaries: none for the fused AdamW a GPU runs (torch's fused=True or
# DeepSpeed's FusedAdam); torch's single-tensor AdamW on the CPU makes two fp32 tensors the size of
# what it updates (sqrt of the variance, then its quotient) (measured on the CPU).
CPU_ADAM_TEMPORARY_BYTES = 2 * FP32

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

    @property
    def weight_bytes(self) -> int:
        return FP32 if self.precision == "fp32" else 2

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
    if training.device == "cpu" and not training.offload_optimizer:
        # ZeRO-0 updates each parameter tensor, ZeRO 1-3 this rank's flat partition.
        updated = largest_tensor(training) if stage == 0 else partition(training)
        layout.step = merge(layout.step, {"temporaries": CPU_ADAM_TEMPORARY_BYTES * updated})
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
    return [PhaseMemory(name, merge(layout.resident, extra)) for name, extra in zip(PHASES, extras)]


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
    """ZeRO-0. fp32: torch's AdamW alone (weights, gradients, 8 bytes of moments). bf16/fp16: DeepSpeed's
    FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py): 16-bit weights and gradients, fp32 masters
    and moments; its step first copies every gradient to fp32. After the backward pass the engine
    all-reduces the gradients through a flattened copy (engine.allreduce_bucket)."""
    P, w = held_parameters(training), training.weight_bytes
    gradients = {"gradients": w * P}
    step = {**gradients, **({"temporaries": FP32 * P} if w != FP32 else {})}  # fp32 copies of the gradients
    return StateLayout(resident={"weights": w * P, "optimizer states": (8 if w == FP32 else 12) * P},
                       backward=gradients, accumulated=gradients, step=step,
                       reduction={**gradients, "communication buffers": w * min(P, ALLREDUCE_BUCKET_ELEMENTS)})


def bf16_stage1_layout(training: Training) -> StateLayout:
    """bf16 at ZeRO-1 with fp32 gradient accumulation is DeepSpeed's BF16_Optimizer (runtime/bf16_optimizer.py):
    bf16 weights and gradients, a full fp32 gradient buffer (not partitioned), the fp32 master and moments
    partitioned. The engine all-reduces the fp32 buffers through a flattened copy, sent as bf16."""
    P, Pn = held_parameters(training), partition(training)
    gradients = {"gradients": 2 * P}
    flat = min(P, ALLREDUCE_BUCKET_ELEMENTS)
    return StateLayout(resident={"weights": 2 * P, "gradients": FP32 * P, "optimizer states": 12 * Pn},
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
    resident = {"weights": w * P, "optimizer states": 0 if training.offload_optimizer else 12 * Pn}
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
                "optimizer states": 0 if offloaded else 12 * Pn,
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


# --- the training run as the project sets it up -----------------------------------------------------------------

# Presets with GPT-2's 50,257-token vocabulary; on a GPU they train with 50,304 embedding rows.
GPT2_VOCAB_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
GPU_VOCAB_MULTIPLE = 128


def training_model(project: Project, device: str) -> ModelConfig:
    """The model config a run trains: on a GPU, a GPT-2 preset left at vocab_multiple = 1 pads its
    embedding to a multiple of 128 rows (50,257 → 50,304), so the vocabulary matmuls run on whole tensor-core
    tiles. The padding rows are never looked up or predicted (logits are cut back to vocab_size), and
    consolidation drops them, so counts, logits and the model dir are the same as without padding."""
    model = project.model
    if device == "cuda" and model.vocab_multiple == 1 and model.preset in GPT2_VOCAB_PRESETS:
        return dataclasses.replace(model, vocab_multiple=GPU_VOCAB_MULTIPLE)
    return model


def precision_for(project: Project, device: str, bf16_supported: bool = True) -> str:
    """train.precision with "auto" resolved: bf16 on a GPU that has it, else fp32."""
    precision = project.train.precision
    if precision == "auto":
        return "bf16" if device == "cuda" and bf16_supported else "fp32"
    return precision


@dataclass
class BatchLayout:
    """How one optimizer step is made of sequences."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    seq_len: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


def batch_layout(project: Project, world_size: int) -> BatchLayout:
    """micro × accumulation × ranks; with train.global_batch_tokens the accumulation is derived from it.
    The loader checked seq_len and the batch without the ranks; how many ranks there are is known only now."""
    train, seq_len = project.train, project.seq_len
    accum = train.grad_accum_steps
    if train.global_batch_tokens:
        per_micro_step = train.micro_batch_size * seq_len * world_size
        if train.global_batch_tokens % per_micro_step:
            raise GptError(f"train.global_batch_tokens ({train.global_batch_tokens:,}) is not a multiple of "
                           f"micro_batch_size × seq_len × ranks = {train.micro_batch_size} × {seq_len} × "
                           f"{world_size} = {per_micro_step:,}.")
        accum = train.global_batch_tokens // per_micro_step
    return BatchLayout(train.micro_batch_size, accum, world_size, seq_len)


def training_for(project: Project, device: str, ranks: int, precision: str,
                 checkpointing: Optional[bool] = None) -> Training:
    ds = project.deepspeed
    zero = ds.config.get("zero_optimization", {}) if isinstance(ds.config.get("zero_optimization"), dict) else {}
    return Training(model=training_model(project, device), seq_len=project.seq_len, ranks=ranks,
                    precision=precision, zero_stage=ds.zero_stage, device=device,
                    offload_optimizer=ds.offload_optimizer and ds.zero_stage > 0, offload_params=ds.offload_params,
                    checkpointing=project.train.activation_checkpointing if checkpointing is None else checkpointing,
                    zero={k: v for k, v in zero.items() if k in ZERO_BUFFER_DEFAULTS and isinstance(v, (int, bool))})


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


def parse_memory(text: str) -> int:
    """`80GiB`, `80 GB`, `81920MiB`, `8e10` → bytes (GB is 10^9, GiB 2^30)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in MEMORY_UNITS or float(match.group(1)) <= 0:
        raise GptError(f'--gpu-memory must be a size such as 80GiB, 24GB or 81920MiB, not "{text}".')
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])


# --- memory per GPU -----------------------------------------------------------------------------------------------

# What the plan cannot see, allowed for (estimates, not measured here): the CUDA context of the process
# (kernels and driver state, roughly 0.3-0.8 GiB on current GPUs; already gone from the free memory
# `gpt train` compares with), library workspaces (cuBLAS, NCCL's communicator buffers), and the caching
# allocator's fragmentation, which keeps reserved memory above the peak of allocated tensors (a few percent
# on a training loop of fixed shapes).
CUDA_CONTEXT_BYTES = 512 * 2**20
WORKSPACE_BYTES = 512 * 2**20
FRAGMENTATION = 0.05


def activation_shape(training: Training, micro_batch: int, checkpointing: Optional[bool] = None) -> ActivationShape:
    custom_mask = training.model.attention != "causal"
    return ActivationShape(batch=micro_batch, seq_len=training.seq_len, dtype_bytes=training.weight_bytes,
                           device=training.device, dropout=training.model.dropout,
                           checkpointing=training.checkpointing if checkpointing is None else checkpointing,
                           custom_mask=custom_mask)


@dataclass
class MemoryPlan:
    """Peak bytes per GPU of one training step at `micro_batch`, by term, and what it is compared with."""

    micro_batch: int
    checkpointing: bool
    phases: list[PhaseMemory]
    activations: ActivationEstimate
    allowance: int  # CUDA context, workspaces, fragmentation

    @property
    def peak_phase(self) -> PhaseMemory:
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def peak(self) -> int:
        """Bytes of tensors at the peak (what torch.cuda.max_memory_allocated measures)."""
        return self.peak_phase.total

    @property
    def required(self) -> int:
        return self.peak + self.allowance


def memory_plan(training: Training, micro_batch: int, checkpointing: Optional[bool] = None,
                grad_accum_steps: int = 1, context_counted: bool = False) -> MemoryPlan:
    """`context_counted`: the capacity it is held against is what a live process sees free, with its own
    CUDA context already taken."""
    shape = activation_shape(training, micro_batch, checkpointing)
    activations = activation_memory(training.model, shape)
    phases = model_state_phases(training, activations, grad_accum_steps)
    peak = max(phase.total for phase in phases)
    allowance = 0
    if training.device == "cuda":
        allowance = WORKSPACE_BYTES + (0 if context_counted else CUDA_CONTEXT_BYTES) + int(FRAGMENTATION * peak)
    return MemoryPlan(micro_batch, shape.checkpointing, phases, activations, allowance)


def largest_micro_batch(training: Training, capacity: int, checkpointing: bool, limit: int = 1 << 16,
                        context_counted: bool = False, per_rank: Optional[int] = None) -> int:
    """The largest micro batch whose plan fits in `capacity` bytes (0: not even one sequence). `per_rank`:
    the sequences a rank runs per step; a smaller micro batch accumulates gradients (held between micro
    batches), which is assumed when it is not given."""
    def fits(batch: int) -> bool:
        accumulating = per_rank is None or batch < per_rank
        return memory_plan(training, batch, checkpointing, grad_accum_steps=2 if accumulating else 1,
                           context_counted=context_counted).required <= capacity

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def layouts_for(per_rank_sequences: int, ranks: int, seq_len: int, largest: int) -> Optional[BatchLayout]:
    """The largest micro batch up to `largest` that divides a rank's share of the step, and the
    accumulation that makes up the rest (None when not even one sequence fits)."""
    micro = next((m for m in range(min(largest, per_rank_sequences), 0, -1) if per_rank_sequences % m == 0), 0)
    return BatchLayout(micro, per_rank_sequences // micro, ranks, seq_len) if micro else None


# --- time -------------------------------------------------------------------------------------------------------

# Model FLOPs utilisation assumed for a GPU run (`--mfu` and the live MFU replace it). Public GPT-2 124M
# runs in PyTorch sustain 35-40% by gptcli's FLOP count (855 MFLOPs per token at T = 1024): 1.1M tokens/s
# on 8 A100s, and llm.c's 10B tokens in 45 minutes on 8 H100s. A first run through DeepSpeed, with its
# bucket copies and an untuned micro batch, sits lower: 30%.
TYPICAL_MFU = 0.3
# Data sheets: fp32 without tensor cores is about 1/16 of the dense bf16 peak (A100 19.5 vs 312 TFLOP/s,
# H100 SXM 67 vs 989).
FP32_FRACTION = 1 / 16
# Training on a CPU reaches about half the rate of a large square fp32 matmul (measured on 2 cores:
# nano ~54 and GPT-2 124M ~56 GFLOP/s against ~110 for 1024×1024 matmuls); 0.4 keeps the estimate on
# the long side rather than the short one.
CPU_TRAINING_EFFICIENCY = 0.4
# The seconds of `gpt train` besides its steps. CPU: measured by bench/train_startup.py on 2 shared cores
# (docs/benchmarks.md): about 18 s to the first step (DeepSpeed's import 5 s, its engine 8 s) and 16 s
# after the last (the final checkpoint, the consolidated model, loss.png); the first run on a machine also
# compiles DeepSpeed's shared-memory communication op: 47 s measured on 2 idle cores (80 s of CPU time),
# 261 s on busy ones. GPU (not measured here): the same parts with NCCL's start, and torch.compile, about a minute for
# GPT-2 sized models.
STARTUP_SECONDS = {"cpu": 30.0, "cuda": 30.0}
OP_BUILD_SECONDS = 50.0
COMPILE_SECONDS = 60.0


def sustained_flops(training: Training, peak_flops: Optional[float], mfu: float,
                    cpu_flops: Optional[float]) -> Optional[float]:
    """FLOP/s the whole run can be expected to sustain: on a CPU the measured matmul rate × 0.4 per rank, on
    a GPU its peak × MFU (fp32, or bf16 on a GPU without bf16 tensor cores: 1/16 of the peak) × ranks."""
    if training.device == "cpu":
        return None if cpu_flops is None else cpu_flops * CPU_TRAINING_EFFICIENCY * training.ranks
    if peak_flops is None:
        return None
    return peak_flops * mfu * training.ranks


def startup_seconds(device: str, compile_model: bool, op_build_pending: bool) -> dict[str, float]:
    terms = {"DeepSpeed, the engine, the last checkpoint": STARTUP_SECONDS[device]}
    if op_build_pending:
        terms["building DeepSpeed's CPU communication op (first run on this machine)"] = OP_BUILD_SECONDS
    if compile_model:
        terms["torch.compile"] = COMPILE_SECONDS
    return terms


# --- the plan of a run ------------------------------------------------------------------------------------------


def model_name(config: ModelConfig) -> str:
    """The preset's name only when the model has that preset's shape; otherwise "custom" (with the
    preset it started from, or the preset it happens to equal)."""
    from .presets import PRESETS

    shape = config.architecture_dict()
    if config.preset in PRESETS:
        if preset_model(config.preset).architecture_dict() == shape:
            return config.preset
        return f"custom (changed from {config.preset})"
    same = [name for name in PRESETS if preset_model(name).architecture_dict() == shape]
    return f"custom (the shape of {same[0]})" if same else "custom"


def preset_model(name: str, vocab_size: Optional[int] = None) -> ModelConfig:
    from .config import project_from_dict

    model = {"preset": name} if vocab_size is None else {"preset": name, "vocab_size": vocab_size}
    return project_from_dict({"model": model}).model


@dataclass
class RunPlan:
    """A training run as the project sets it up, before anything is built: what it trains, the memory per
    GPU at its micro batch, what fits, and how long it takes."""

    model_name: str
    parameters: int  # as `gpt inspect-params` counts them
    training: Training
    layout: BatchLayout
    steps: int  # still to run
    eval_tokens: int  # forward-only tokens of the evaluations still to run
    flops_per_token: int
    memory: MemoryPlan
    steps_done: int = 0
    resume_tag: Optional[str] = None
    context_counted: bool = False  # the capacity is free memory a live process saw, its context taken
    capacity: Optional[int] = None  # bytes per GPU the plan is held against
    capacity_source: str = ""
    gpu: Optional[Gpu] = None
    largest: dict[bool, int] = field(default_factory=dict)  # checkpointing → the largest micro batch that fits
    suggestion: Optional[BatchLayout] = None  # the largest micro batch that fits, for the configured step
    rate: Optional[float] = None  # FLOP/s of the whole run
    rate_source: str = ""
    mfu: Optional[float] = None
    startup: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.layout.tokens_per_step

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def total_flops(self) -> float:
        # An evaluation token is a forward pass only: a third of the 6N training FLOPs.
        return float(self.flops_per_token) * (self.total_tokens + self.eval_tokens / 3)

    @property
    def step_seconds(self) -> Optional[float]:
        return None if not self.rate else self.flops_per_token * self.tokens_per_step / self.rate

    @property
    def train_seconds(self) -> Optional[float]:
        return None if not self.rate else self.total_flops / self.rate

    @property
    def startup_seconds(self) -> float:
        return sum(self.startup.values())

    @property
    def fits(self) -> Optional[bool]:
        return None if self.capacity is None else self.memory.required <= self.capacity


def per_rank_sequences(project: Project, ranks: int, seq_len: int) -> int:
    """Sequences each rank runs per optimizer step: micro batch × accumulation, or a rank's share of
    train.global_batch_tokens."""
    train = project.train
    if not train.global_batch_tokens:
        return train.micro_batch_size * train.grad_accum_steps
    per_step = seq_len * ranks
    if train.global_batch_tokens % per_step:
        raise GptError(f"train.global_batch_tokens ({train.global_batch_tokens:,}) is not a multiple of "
                       f"seq_len × ranks = {seq_len} × {ranks} = {per_step:,}.")
    return train.global_batch_tokens // per_step


def chosen_micro_batch(micro_batch, per_rank: int, configured: int, largest: dict[bool, int],
                       checkpointing: bool) -> int:
    """The micro batch to plan: the configured one, a number given, or "auto" (the largest that fits and
    divides a rank's share of the step)."""
    if micro_batch is None:
        return configured
    if micro_batch == "auto":
        if not largest:
            raise GptError("--micro-batch auto needs the GPU's memory: give --gpu NAME or --gpu-memory SIZE.")
        micro = next((m for m in range(min(largest[checkpointing], per_rank), 0, -1) if per_rank % m == 0), 0)
        return micro or 1
    if per_rank % micro_batch:
        raise GptError(f"--micro-batch {micro_batch} does not divide the {per_rank} sequences each rank runs per "
                       "step (train.micro_batch_size × grad_accum_steps, or train.global_batch_tokens).")
    return micro_batch


def steps_and_evaluations(project: Project, layout: BatchLayout, done: int) -> tuple[int, int, int]:
    """(optimizer steps still to run, forward-only tokens of the evaluations still to run, steps done)."""
    train = project.train
    steps = train.max_steps
    if train.max_tokens > 0:
        steps = min(steps, math.ceil(train.max_tokens / layout.tokens_per_step))
    done = min(done, steps)
    eval_tokens = 0
    if train.eval_every > 0 and steps > done:
        # every eval_every steps, and at the end
        evaluations = steps // train.eval_every - done // train.eval_every + (steps % train.eval_every > 0)
        eval_tokens = evaluations * train.eval_batches * layout.micro_batch_size * layout.seq_len * layout.world_size
    return steps - done, eval_tokens, done


def plan_run(project: Project, *, device: str = "cuda", ranks: int = 1, precision: Optional[str] = None,
             gpu: Optional[Gpu] = None, capacity: Optional[int] = None, capacity_source: str = "",
             peak_flops: Optional[float] = None, mfu: Optional[float] = None, micro_batch=None,
             cpu_flops: Optional[float] = None, resume: Optional[tuple[str, int]] = None,
             op_build_pending: bool = False, compile_model: bool = False,
             model: Optional[ModelConfig] = None, context_counted: bool = False) -> RunPlan:
    """The plan of `project` on `ranks` ranks of `device` (or of the same run with another `model`).
    capacity: bytes per GPU to hold the plan against (a GPU's memory, or what is free). micro_batch: None
    (as configured), a number, or "auto". resume: (checkpoint tag, its step) the run continues from."""
    precision = precision or precision_for(project, device, gpu.bf16 if gpu else True)
    training = training_for(project, device, ranks, precision)
    if model is not None:
        training = dataclasses.replace(training, model=model, seq_len=min(training.seq_len, model.block_size))
    per_rank = per_rank_sequences(project, ranks, training.seq_len)
    largest = {} if capacity is None else {
        c: largest_micro_batch(training, capacity, c, context_counted=context_counted, per_rank=per_rank)
        for c in (False, True)}
    micro = chosen_micro_batch(micro_batch, per_rank, min(project.train.micro_batch_size, per_rank), largest,
                               training.checkpointing)
    layout = BatchLayout(micro, max(1, per_rank // micro), ranks, training.seq_len)
    steps, eval_tokens, done = steps_and_evaluations(project, layout, resume[1] if resume else 0)
    mfu = TYPICAL_MFU if mfu is None else mfu
    peak = peak_flops or (project.train.peak_tflops * 1e12 if project.train.peak_tflops else None) or (
        gpu.peak_flops if gpu else None)
    if peak and (precision == "fp32" or (gpu is not None and not gpu.bf16 and precision == "bf16")):
        peak *= FP32_FRACTION
    rate = sustained_flops(training, peak, mfu, cpu_flops)
    source = "measured on this CPU" if device == "cpu" else f"{mfu:.0%} of peak"
    return RunPlan(
        model_name=model_name(training.model), parameters=sum(parameter_components(training.model).values()),
        training=training, layout=layout, steps=steps, eval_tokens=eval_tokens,
        flops_per_token=flops_per_token(training.model, training.seq_len),
        memory=memory_plan(training, micro, grad_accum_steps=layout.grad_accum_steps, context_counted=context_counted),
        steps_done=done, resume_tag=resume[0] if resume else None, context_counted=context_counted,
        capacity=capacity, capacity_source=capacity_source, gpu=gpu, largest=largest,
        suggestion=layouts_for(per_rank, ranks, training.seq_len, largest[training.checkpointing]) if largest else None,
        rate=rate, rate_source=source, mfu=mfu if device == "cuda" else None,
        startup=startup_seconds(device, compile_model, op_build_pending))


def fitting_change(project: Project, plan: RunPlan) -> str:
    """The smallest change to the project that makes `plan` fit its capacity, in words with the keys to set:
    a smaller micro batch with more accumulation (the step unchanged), activation checkpointing, a higher
    ZeRO stage, the optimizer state in CPU memory; or what is left when none does."""
    training, capacity = plan.training, plan.capacity
    per_rank = plan.layout.micro_batch_size * plan.layout.grad_accum_steps
    for checkpointing in (training.checkpointing, True):
        best = layouts_for(per_rank, training.ranks, training.seq_len,
                           largest_micro_batch(training, capacity, checkpointing, context_counted=plan.context_counted,
                                               per_rank=per_rank))
        if best is not None:
            keys = [f"train.micro_batch_size = {best.micro_batch_size}"]
            if not project.train.global_batch_tokens:
                keys.append(f"train.grad_accum_steps = {best.grad_accum_steps}")
            if checkpointing and not training.checkpointing:
                keys.append("train.activation_checkpointing = true")
            return f"{' with '.join(keys)} (the same {per_rank} sequences per rank per step)"
    for stage in range(training.zero_stage + 1, 4):
        staged = dataclasses.replace(training, zero_stage=stage, checkpointing=True)
        if memory_plan(staged, 1, context_counted=plan.context_counted).required <= capacity:
            return f"deepspeed.zero_stage = {stage} with train.activation_checkpointing = true and a micro batch of 1"
    offloaded = dataclasses.replace(training, zero_stage=3, checkpointing=True, offload_optimizer=True)
    if memory_plan(offloaded, 1, context_counted=plan.context_counted).required <= capacity:
        return ("deepspeed.zero_stage = 3 with deepspeed.offload_optimizer = true, activation checkpointing and a "
                "micro batch of 1")
    return "none of micro batch 1, activation checkpointing, ZeRO-3 and offloading fits: more GPUs, larger ones or a smaller model"


# --- in words -----------------------------------------------------------------------------------------------------


def human_count(n: float) -> str:
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:.0f}"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    minutes = seconds / 60
    if minutes < 90:
        return f"about {round(minutes)} minute{'s' if round(minutes) != 1 else ''}"
    hours = minutes / 60
    if hours < 48:
        return f"about {hours:.0f} hours" if hours >= 10 else f"about {hours:.1f} hours"
    return f"about {hours / 24:.0f} days"


def gib(size: float) -> str:
    """A size in GiB, or MiB below one GiB."""
    return f"{size / GiB:.1f} GiB" if size >= GiB else f"{size / 2**20:.0f} MiB"


def memory_line(plan: RunPlan) -> str:
    """Peak memory per GPU (per rank on a CPU) by its largest terms, against the capacity when there is one."""
    terms = sorted(plan.memory.peak_phase.terms.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{term} {gib(size)}" for term, size in terms[:4])
    if plan.training.device == "cpu":
        return f"memory per rank: about {gib(plan.memory.peak)} at the peak ({shown})"
    line = (f"memory per GPU: {gib(plan.memory.peak)} at the peak ({shown}) + {gib(plan.memory.allowance)} "
            f"allowance = {gib(plan.memory.required)}")
    if plan.capacity is not None:
        line += f" of {gib(plan.capacity)} {plan.capacity_source}: {'fits' if plan.fits else 'does not fit'}"
    return line


def plan_summary(plan: RunPlan) -> list[str]:
    """The plan's batch, micro batches that fit, and time, as `gpt inspect-params` prints them."""
    training, layout = plan.training, plan.layout
    where = f"{training.ranks} × {plan.gpu.name}" if plan.gpu else f"{training.ranks} GPU(s)"
    lines = [f"plan: {where}, {training.precision}, ZeRO stage {training.zero_stage}"
             f"{', activation checkpointing' if plan.memory.checkpointing else ''}; micro batch "
             f"{layout.micro_batch_size} × {layout.grad_accum_steps} accumulation × {training.ranks} GPU(s) × "
             f"{layout.seq_len:,} tokens = {plan.tokens_per_step:,} tokens per step"]
    if plan.largest:
        lines.append(f"largest micro batch that fits: {plan.largest[False]} (with activation checkpointing: "
                     f"{plan.largest[True]})")
    if plan.suggestion is not None:
        per_rank = layout.micro_batch_size * layout.grad_accum_steps
        lines.append(f"for the {per_rank} sequences per GPU of a step: micro batch {plan.suggestion.micro_batch_size} "
                     f"× {plan.suggestion.grad_accum_steps} accumulation")
    if plan.rate:
        lines.append(f"time: {plan.step_seconds:.3g} s per step at {plan.mfu:.0%} MFU; {plan.steps:,} steps "
                     f"{human_duration(plan.train_seconds)} + start-up {human_duration(plan.startup_seconds)}")
    else:
        lines.append("time: give --gpu NAME (or [train] peak_tflops) for an estimate")
    return lines
