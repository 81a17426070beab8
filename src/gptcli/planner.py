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
        """In lm_head's backward: everything kept, the logits' gradient and lm_head's weight gradient."""
        return self.kept + self.transients["head backward"]

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
    B, T, C, H = shape.batch, shape.seq_len, config.n_embd, config.n_head
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
    head_backward = B * T * config.vocab_size * b + config.padded_vocab_size * C * b
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


def resolve_seq_len(project: Project) -> int:
    seq_len = project.train.seq_len or project.model.block_size
    if seq_len > project.model.block_size and project.model.position == "learned":
        raise GptError(f"train.seq_len ({seq_len}) exceeds model.block_size ({project.model.block_size}).")
    return seq_len


def batch_layout(project: Project, world_size: int) -> BatchLayout:
    """micro × accumulation × ranks; with train.global_batch_tokens the accumulation is derived from it."""
    train, seq_len = project.train, resolve_seq_len(project)
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
    return Training(model=training_model(project, device), seq_len=resolve_seq_len(project), ranks=ranks,
                    precision=precision, zero_stage=ds.zero_stage, device=device,
                    offload_optimizer=ds.offload_optimizer and ds.zero_stage > 0, offload_params=ds.offload_params,
                    checkpointing=project.train.activation_checkpointing if checkpointing is None else checkpointing,
                    zero={k: v for k, v in zero.items() if k in ZERO_BUFFER_DEFAULTS and isinstance(v, (int, bool))})


# --- memory per GPU -----------------------------------------------------------------------------------------------

# What the plan cannot see, allowed for: the CUDA context and library workspaces (cuBLAS, NCCL's buffers),
# about 0.5-1 GiB per process on current GPUs, and the caching allocator's fragmentation, which keeps
# reserved memory above the peak of allocated tensors (PyTorch's memory_stats: typically a few percent
# on a training loop of fixed shapes).
CUDA_CONTEXT_BYTES = 1 * 2**30
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
                grad_accum_steps: int = 1) -> MemoryPlan:
    shape = activation_shape(training, micro_batch, checkpointing)
    activations = activation_memory(training.model, shape)
    phases = model_state_phases(training, activations, grad_accum_steps)
    peak = max(phase.total for phase in phases)
    allowance = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * peak) if training.device == "cuda" else 0
    return MemoryPlan(micro_batch, shape.checkpointing, phases, activations, allowance)


def largest_micro_batch(training: Training, capacity: int, checkpointing: bool, limit: int = 1 << 16) -> int:
    """The largest micro batch whose plan fits in `capacity` bytes (0: not even one sequence)."""
    def fits(batch: int) -> bool:
        return memory_plan(training, batch, checkpointing).required <= capacity

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
