"""What one micro batch keeps for its backward pass, term by term: the activations of each block, the
embeddings, the head and the chunked loss, and the transients of the backward pass (docs/planning.md).

Shapes: B micro batch (sequences per rank), T tokens per sequence, C = n_embd, H heads, D = C / H,
r = mlp_ratio, V vocabulary (Vp padded), L layers, b bytes of one activation value (2 in bf16/fp16, 4 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

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
    custom_mask: bool = False  # a materialised (1, 1, T, T) mask: any pattern but plain causal (config.CAUSAL_PATTERN)
    mask_rows: int = 1  # rows of that mask: 1, or the micro batch when it differs by row (documents, draws)
    block_mask: bool = False  # FlexAttention over a block mask (CUDA): no dense mask, the kernel keeps what flash does


def attention_kernel(config: ModelConfig, shape: ActivationShape) -> str:
    """The kernel scaled_dot_product_attention picks, which decides what it keeps for the backward pass:
    "flash" (q, k, v, the output, a logsumexp per row: no T×T scores), "efficient" (the same plus the mask as
    an additive bias) or "math" (the T×T probabilities, in fp32). On CUDA, flash needs bf16/fp16 and no mask;
    the memory-efficient kernel takes fp32, masks and dropout; both need a head size divisible by 8. On the
    CPU the flash kernel takes masks but not dropout (measured with torch 2.13: dropout falls back to math)."""
    if shape.block_mask:
        return "flex"
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
        if shape.custom_mask and kernel != "flex":
            total += shape.mask_rows * T * mask_columns(T, kernel) * b  # the bool mask as an additive bias, per layer
    if config.position == "rotary" and kernel != "math":
        # The rotated q and k are new tensors the kernel keeps; its output then follows q's (B, H, T, D)
        # layout, so c_proj's input is a copy rather than the same storage. (apply_rotary's fp32 products
        # keep only the cos/sin tables, shared by all layers.)
        total += 3 * btc * b
    if shape.dropout > 0:
        total += 2 * btc * dropout_mask_bytes(shape)  # after attn.c_proj and mlp.c_proj
    total += 2 * 2 * B * T * norm_stat_bytes(shape)  # ln_1, ln_2: mean and rstd per row
    return total


def block_mask_bytes(shape: ActivationShape) -> int:
    """FlexAttention's BlockMask, made once per forward and shared by the blocks: for each row and each
    128-token block of queries, its key blocks (counts and indices, int32) in four tables (partial and
    full blocks, by query and by key for the backward pass)."""
    blocks = -(-shape.seq_len // 128)
    return 4 * shape.mask_rows * (blocks * blocks + blocks) * 4


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
        shared = shape.mask_rows * T * T if shape.custom_mask and not shape.block_mask else 0
    else:
        blocks, shared = config.n_layer * per_layer, 0
    if shape.block_mask:
        shared += block_mask_bytes(shape)
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
