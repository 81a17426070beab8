"""The plan of a training run: the run as the project sets it up (model, precision, batch layout), its
memory per GPU at a micro batch, the largest micro batch that fits, the time, and the change that makes a
run fit."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..batch import BatchLayout, batch_layout
from ..config import BLOCK_MASK_PATTERNS, CAUSAL_PATTERN, ONE_MASK_PATTERNS, ModelConfig, Project
from ..errors import GptError
from ..optimizers import ADAMW, optimizer_spec
from ..presets import family_of, preset_for_shape
from .activations import FP32, ActivationEstimate, ActivationShape, activation_memory, attention_kernel
from .counts import flops_per_token, parameter_components
from .gpus import Gpu, cuda_context_bytes
from .states import PHASES, ZERO_BUFFER_DEFAULTS, PhaseMemory, Training, held_parameters, model_state_phases

# --- the training run as the project sets it up -----------------------------------------------------------------

# On a GPU the GPT-2 family's presets (family "gpt2" in presets.py) train with 50,304 embedding rows.
GPU_VOCAB_MULTIPLE = 128


def training_model(project: Project, device: str) -> ModelConfig:
    """The model config a run trains: on a GPU, a preset of the GPT-2 family left at vocab_multiple = 1 pads
    its embedding to a multiple of 128 rows (50,257 → 50,304), so the vocabulary matmuls run on whole
    tensor-core tiles. The padding rows are never looked up or predicted (logits are cut back to vocab_size),
    and consolidation drops them, so counts, logits and the model dir are the same as without padding."""
    model = project.model
    if device == "cuda" and model.vocab_multiple == 1 and family_of(model.preset) == "gpt2":
        return dataclasses.replace(model, vocab_multiple=GPU_VOCAB_MULTIPLE)
    return model


def precision_for(project: Project, device: str, bf16_supported: bool = True) -> str:
    """train.precision with "auto" resolved: bf16 on a GPU that has it, else fp32."""
    precision = project.train.precision
    if precision == "auto":
        return "bf16" if device == "cuda" and bf16_supported else "fp32"
    return precision


def training_for(project: Project, device: str, ranks: int, precision: str,
                 checkpointing: Optional[bool] = None, gpu: Optional[Gpu] = None) -> Training:
    ds = project.deepspeed
    zero = ds.config.get("zero_optimization", {}) if isinstance(ds.config.get("zero_optimization"), dict) else {}
    return Training(model=training_model(project, device), seq_len=project.seq_len, ranks=ranks,
                    precision=precision, zero_stage=ds.zero_stage, device=device,
                    offload_optimizer=ds.offload_optimizer and ds.zero_stage > 0, offload_params=ds.offload_params,
                    checkpointing=project.train.activation_checkpointing if checkpointing is None else checkpointing,
                    zero={k: v for k, v in zero.items() if k in ZERO_BUFFER_DEFAULTS and isinstance(v, (int, bool))},
                    optimizer=optimizer_spec(project.train.optimizer), gpu=gpu if device == "cuda" else None,
                    train=project.train)


def resident_on_cpu(training: Training) -> Training:
    """The run as the memory its tensors really take on the CPU. Linux gives a page memory when it is first
    written, and DeepSpeed's reduce bucket (reduce_bucket_size elements whatever the model: 1.9 GiB in fp32 by
    default) is written only as far as one step's gradients fill it, so it counts here as at most the
    model's parameters. With the process itself (CPU_PROCESS_BYTES) the plan is within a few percent of the
    peak resident set of nano and tiny runs (bench/plan_vs_measured.py); the whole bucket would have
    added 1.6 GiB to nano's."""
    bucket = min(training.zero_setting("reduce_bucket_size"), held_parameters(training))
    return dataclasses.replace(training, zero={**training.zero, "reduce_bucket_size": bucket})


# --- memory per GPU -----------------------------------------------------------------------------------------------

# What the plan's tensors leave out, allowed for. Each is said in the output with whether it is an
# assumption (docs/planning.md, "The allowances").
# cuBLAS's and cuDNN's workspaces (assumed).
WORKSPACE_BYTES = 512 * 2**20
# The caching allocator keeps reserved memory above the peak of allocated tensors (assumed: a few percent
# on a training loop of fixed shapes).
FRAGMENTATION = 0.05
# NCCL's buffers per communicator once it has run an all-reduce: 544 MiB for a group of two and 688 MiB
# for four A100s over NVLink (NVIDIA/nccl #964; #864 reports about 1.6 GB with the process's context). On
# HGX Hopper and Blackwell, NVLink SHARP adds nvlsPerRankSize = 288 MiB per rank for groups of more than two
# (vllm-project/vllm #9699's NCCL log). A run has two: torch's default group and DeepSpeed's data-parallel
# clone of it (deepspeed/utils/groups._clone_world_group).
NCCL_GROUP_BYTES = 688 * 2**20
NVLS_GROUP_BYTES = 288 * 2**20
NCCL_GROUPS = 2
# On the CPU, what a training rank holds besides the plan's tensors: the interpreter, torch's and
# DeepSpeed's code and state, the tokenizer, the data loader and its prefetched batches, the engine's
# bookkeeping. Measured as the peak RSS (VmHWM) of nano and tiny runs less the plan's tensors
# (bench/plan_vs_measured.py, docs/benchmarks.md).
CPU_PROCESS_BYTES = 560 * 2**20


@dataclass(frozen=True)
class Allowance:
    """Bytes the plan's tensors leave out: what they are for, and whether the figure is an assumption."""

    size: int
    assumed: bool


def activation_shape(training: Training, micro_batch: int, checkpointing: Optional[bool] = None) -> ActivationShape:
    pattern = training.model.attention  # config.CAUSAL_PATTERN says why by name
    block_mask = training.device == "cuda" and pattern in BLOCK_MASK_PATTERNS and training.model.dropout == 0
    return ActivationShape(batch=micro_batch, seq_len=training.seq_len, dtype_bytes=training.weight_bytes,
                           device=training.device, dropout=training.model.dropout,
                           checkpointing=training.checkpointing if checkpointing is None else checkpointing,
                           custom_mask=pattern != CAUSAL_PATTERN,
                           mask_rows=1 if pattern in ONE_MASK_PATTERNS else micro_batch, block_mask=block_mask)


@dataclass
class MemoryPlan:
    """Peak bytes per GPU of one training step at `micro_batch`, by term, and what it is compared with."""

    micro_batch: int
    checkpointing: bool
    phases: list[PhaseMemory]
    activations: ActivationEstimate
    allowances: dict[str, Allowance] = field(default_factory=dict)

    @property
    def peak_phase(self) -> PhaseMemory:
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def peak(self) -> int:
        """Bytes of tensors at the peak (what torch.cuda.max_memory_allocated measures)."""
        return self.peak_phase.total

    @property
    def allowance(self) -> int:
        return sum(allowance.size for allowance in self.allowances.values())

    @property
    def required(self) -> int:
        return self.peak + self.allowance


def allowances(training: Training, phases: list[PhaseMemory], context_counted: bool) -> dict[str, Allowance]:
    """What the tensors leave out, by name. CUDA: the context (unless the capacity is what a live process
    sees free), workspaces, NCCL's communicators on several ranks, the allocator's fragmentation, and at
    ZeRO-0 in 16 bits the larger step of DeepSpeed's fused optimizer. CPU: the process itself."""
    peak = max(phase.total for phase in phases)
    if training.device == "cpu":
        return {"the process (Python, torch, DeepSpeed, the data loader)": Allowance(CPU_PROCESS_BYTES, False)}
    found = {} if context_counted else {"CUDA context": Allowance(cuda_context_bytes(training.gpu), True)}
    found["cuBLAS and cuDNN workspaces"] = Allowance(WORKSPACE_BYTES, True)
    if training.ranks > 1:
        nvls = NVLS_GROUP_BYTES if training.gpu is not None and training.gpu.nvls and training.ranks > 2 else 0
        found[f"NCCL buffers ({NCCL_GROUPS} communicators)"] = Allowance(NCCL_GROUPS * (NCCL_GROUP_BYTES + nvls), True)
    fused = fused_step_bytes(training)
    if fused:
        step = next(phase.total for phase in phases if phase.phase == PHASES[-1])
        extra = max(0, step + fused - peak)
        if extra:
            found["ZeRO-0's fp32 gradient copies (DeepSpeed's fused step)"] = Allowance(extra, True)
    found["allocator fragmentation"] = Allowance(int(FRAGMENTATION * peak), True)
    return found


def fused_step_bytes(training: Training) -> int:
    """At ZeRO-0 in bf16/fp16 with AdamW on a GPU, DeepSpeed wraps a prebuilt FusedAdam in FP16_Optimizer
    (runtime/fp16/fused_optimizer.py), whose step makes an fp32 copy of every gradient and then flattens them
    into one more fp32 buffer: 4P beyond the unfused step the layout counts (states.stage0_layout). Whether
    FusedAdam was built into DeepSpeed is not known here, so the larger step is allowed for."""
    if training.device != "cuda" or training.zero_stage != 0 or training.precision == "fp32":
        return 0
    if training.optimizer.name != ADAMW.name:
        return 0
    return FP32 * held_parameters(training)


def memory_plan(training: Training, micro_batch: int, checkpointing: Optional[bool] = None,
                grad_accum_steps: int = 1, context_counted: bool = False) -> MemoryPlan:
    """`context_counted`: the capacity it is held against is what a live process sees free, with its own
    CUDA context already taken."""
    shape = activation_shape(training, micro_batch, checkpointing)
    activations = activation_memory(training.model, shape)
    phases = model_state_phases(training, activations, grad_accum_steps)
    return MemoryPlan(micro_batch, shape.checkpointing, phases, activations,
                      allowances(training, phases, context_counted))


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


# --- time -------------------------------------------------------------------------------------------------------

# Model FLOPs utilisation of a GPT-2 run in bf16/fp16 by GPU generation, at 124M and at 1.5B parameters, by
# gptcli's FLOP count, from published runs (docs/planning.md, "MFU": nanoGPT, build-nanogpt, llm.c, the
# Megatron-LM and ZeRO papers). Between the two sizes by log(parameters); outside them the nearer figure.
# Ampere: PyTorch runs of 124M sustain 30% (nanoGPT, 8 A100s) to 38% (build-nanogpt), llm.c 60% at 124M
# and 64% at 774M. Hopper: llm.c 40% at 124M and 49% at 1.5B on H100s (2.1x an A100's tokens/s where the
# peaks say 3.2x). Ada: nanoGPT 124M on an RTX 4090, 55%. Volta: Megatron-LM's 1.2B and ZeRO's runs on
# V100s, 30% of the fp16 peak. Blackwell and Turing have no published GPT-2 run here: Hopper's and Volta's
# figures stand in for them (the plan says so).
MFU_16BIT = {"ampere": (0.45, 0.55), "ada": (0.45, 0.55), "hopper": (0.30, 0.42), "volta": (0.25, 0.30),
             "blackwell": (0.30, 0.42), "turing": (0.25, 0.30)}
MFU_SIZES = (124e6, 1.5e9)  # parameters at which MFU_16BIT's two figures hold
MFU_BORROWED = {"blackwell": "hopper", "turing": "volta"}  # generations whose figures are another's
# fp32 matmuls on TF32 tensor cores: the same fraction of the TF32 peak (which is half the 16-bit one) is
# assumed; on FP32 cores alone (Volta, Turing), where matmuls come close to the peak and the rest of a step
# costs relatively less, half of the FP32 peak (assumed). No published GPT-2 run in fp32 was found.
FP32_CORES_MFU = 0.5
# A GPU not in the table (its peak from [train] peak_tflops): the middle of the table's figures (assumed).
UNKNOWN_GPU_MFU = 0.35
# A peak given for an unknown GPU is its 16-bit one; fp32 runs on its TF32 tensor cores at half of it
# (every Ampere and later data sheet).
TF32_FRACTION = 0.5
# Training on a CPU reaches about half the rate of a large square fp32 matmul (measured on 2 cores:
# nano ~54 and GPT-2 124M ~56 GFLOP/s against ~110 for 1024×1024 matmuls); 0.4 keeps the estimate on
# the long side rather than the short one.
CPU_TRAINING_EFFICIENCY = 0.4
# The seconds of `gpt train` besides its steps. CPU: measured by bench/train_startup.py on 2 shared cores
# (docs/benchmarks.md): about 18 s to the first step (DeepSpeed's import 5 s, its engine 8 s) and 16 s
# after the last (the final checkpoint, the consolidated model, loss.png); the first run on a machine also
# compiles DeepSpeed's shared-memory communication op: OP_BUILD_SECONDS, measured by bench/train_startup.py
# --op-build on 2 idle cores (80 s of CPU time; 261 s on busy ones), the one figure pre-flight, the set-up
# lines and the build's own line state. GPU (not measured here): the same parts with NCCL's start, and
# torch.compile, about a minute for GPT-2 sized models.
STARTUP_SECONDS = {"cpu": 30.0, "cuda": 30.0}
OP_BUILD_SECONDS = 47.0
COMPILE_SECONDS = 60.0


def startup_seconds(device: str, compile_model: bool, op_build_pending: bool) -> dict[str, float]:
    terms = {"DeepSpeed, the engine, the last checkpoint": STARTUP_SECONDS[device]}
    if op_build_pending:
        terms["building DeepSpeed's CPU communication op (first run in this Python environment)"] = OP_BUILD_SECONDS
    if compile_model:
        terms["torch.compile"] = COMPILE_SECONDS
    return terms


def mfu_for(gpu: Optional[Gpu], precision: str, parameters: int) -> tuple[float, str]:
    """The MFU a run of `parameters` at `precision` can be expected to sustain on `gpu` (MFU_16BIT), and
    where the figure comes from, in words."""
    if gpu is None:
        return UNKNOWN_GPU_MFU, "assumed for a GPU not in the table"
    if gpu.peak_for(precision) == gpu.peak_fp32:
        return FP32_CORES_MFU, f"assumed for fp32 on {gpu.name}'s FP32 cores"
    small, large = MFU_16BIT[gpu.generation]
    low, high = MFU_SIZES
    where = min(1.0, max(0.0, math.log(parameters / low) / math.log(high / low)))
    source = f"published runs on {gpu.generation} GPUs, by model size"
    borrowed = MFU_BORROWED.get(gpu.generation)
    if borrowed:
        source = f"assumed: {borrowed}'s published figures (none for {gpu.generation})"
    if precision == "fp32":
        source += "; TF32 assumed to keep the 16-bit fraction"
    return round(small + (large - small) * where, 3), source


def peak_of(gpu: Optional[Gpu], precision: str, given: Optional[float]) -> Optional[float]:
    """FLOP/s one GPU can reach at `precision`: the table's (Gpu.peak_for), or a 16-bit peak `given`
    ([train] peak_tflops) taken down to TF32 for fp32."""
    if given and gpu is not None:
        return given * gpu.peak_for(precision) / gpu.peak_16bit
    if given:
        return given if precision != "fp32" else given * TF32_FRACTION
    return gpu.peak_for(precision) if gpu is not None else None



# --- the plan of a run ------------------------------------------------------------------------------------------


def model_name(config: ModelConfig) -> str:
    """The preset's name only when the model has that preset's shape; otherwise "custom" (with the
    preset it started from, or the preset it happens to equal)."""
    shape, customised_from = preset_for_shape(config)
    if customised_from is not None:
        return f"custom (changed from {customised_from})"
    if shape is None:
        return "custom"
    return shape.name if shape.name == config.preset else f"custom (the shape of {shape.name})"


def preset_model(name: str, vocab_size: Optional[int] = None) -> ModelConfig:
    from ..config import project_from_dict

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

    @property
    def attention_kernel(self) -> str:
        """The kernel scaled_dot_product_attention runs in this plan (activations.attention_kernel: by device,
        precision, mask and head size), which decides what attention keeps."""
        return attention_kernel(self.training.model, activation_shape(self.training, self.layout.micro_batch_size))


def chosen_layout(micro_batch, configured: BatchLayout, largest: dict[bool, int], checkpointing: bool) -> BatchLayout:
    """The layout to plan: as configured, in micro batches of a number given, or "auto" (the largest micro
    batch that fits and divides a rank's share of the step)."""
    if micro_batch is None:
        return configured
    if micro_batch == "auto":
        if not largest:
            raise GptError("--micro-batch auto needs the GPU's memory: give --gpu NAME or --gpu-memory SIZE.")
        limit = max(1, largest[checkpointing])
    else:
        per_rank = configured.sequences_per_rank
        if per_rank % micro_batch:
            raise GptError(f"--micro-batch {micro_batch} does not divide the {per_rank} sequences each rank runs "
                           "per step (train.micro_batch_size × grad_accum_steps, or train.global_batch_tokens).")
        limit = micro_batch
    layout = configured.in_micro_batches(limit)
    assert layout is not None, limit  # a limit of one sequence or more: a micro batch of one always divides
    return layout


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


def configured_layout(project: Project, seq_len: int, ranks: int, micro_batch=None) -> BatchLayout:
    """The project's batch layout (batch.batch_layout, the one rule). With a step set in tokens
    (train.global_batch_tokens), a micro batch asked for is the micro batch before the rule is checked, so
    a step that is a multiple of it (× seq_len × ranks) is planned whatever train.micro_batch_size says;
    "auto" starts from one sequence, which any step allows."""
    train = project.train
    if micro_batch is None or not train.global_batch_tokens:
        return batch_layout(train, seq_len, ranks)
    try:
        return batch_layout(dataclasses.replace(train, micro_batch_size=1 if micro_batch == "auto" else micro_batch),
                            seq_len, ranks)
    except GptError as error:
        raise GptError(f"--micro-batch {micro_batch} does not fit the step: {error}") from None


def run_rate(training: Training, gpu: Optional[Gpu], project: Project, parameters: int, *,
             peak_flops: Optional[float], mfu: Optional[float], cpu_flops: Optional[float],
             measured_flops: Optional[float]) -> tuple[Optional[float], str, Optional[float]]:
    """(FLOP/s of the whole run, where the figure comes from, the MFU on a GPU). The order of preference:
    `mfu` given (--mfu), the speed a run of this project measured (`measured_flops`, per rank), then on a CPU
    the matmul rate measured here × CPU_TRAINING_EFFICIENCY, on a GPU its peak at the run's precision × the
    MFU of its generation and the model's size (mfu_for)."""
    ranks = training.ranks
    if training.device == "cpu":
        if measured_flops:
            return measured_flops * ranks, "measured by this project's last run", None
        if cpu_flops is None:
            return None, "", None
        return cpu_flops * CPU_TRAINING_EFFICIENCY * ranks, "measured on this CPU", None
    given = peak_flops or (project.train.peak_tflops * 1e12 if project.train.peak_tflops else None)
    peak = peak_of(gpu, training.precision, given)
    if not peak:
        return None, "", None
    if mfu is not None:
        source = "--mfu"
    elif measured_flops:
        mfu, source = measured_flops / peak, "measured by this project's last run"
    else:
        mfu, source = mfu_for(gpu, training.precision, parameters)
    return peak * mfu * ranks, source, mfu


def plan_run(project: Project, *, device: str = "cuda", ranks: int = 1, precision: Optional[str] = None,
             gpu: Optional[Gpu] = None, capacity: Optional[int] = None, capacity_source: str = "",
             peak_flops: Optional[float] = None, mfu: Optional[float] = None, micro_batch=None,
             cpu_flops: Optional[float] = None, measured_flops: Optional[float] = None,
             resume: Optional[tuple[str, int]] = None, op_build_pending: bool = False, compile_model: bool = False,
             model: Optional[ModelConfig] = None, context_counted: bool = False) -> RunPlan:
    """The plan of `project` on `ranks` ranks of `device` (or of the same run with another `model`).
    capacity: bytes per GPU to hold the plan against (a GPU's memory, or what is free). micro_batch: None
    (as configured), a number, or "auto". resume: (checkpoint tag, its step) the run continues from. The
    speed: run_rate's arguments."""
    precision = precision or precision_for(project, device, gpu.bf16 if gpu else True)
    training = training_for(project, device, ranks, precision, gpu=gpu)
    if model is not None:
        training = dataclasses.replace(training, model=model, seq_len=min(training.seq_len, model.block_size))
    if device == "cpu":
        training = resident_on_cpu(training)
    configured = configured_layout(project, training.seq_len, ranks, micro_batch)
    largest = {} if capacity is None else {
        c: largest_micro_batch(training, capacity, c, context_counted=context_counted,
                               per_rank=configured.sequences_per_rank) for c in (False, True)}
    layout = chosen_layout(micro_batch, configured, largest, training.checkpointing)
    steps, eval_tokens, done = steps_and_evaluations(project, layout, resume[1] if resume else 0)
    parameters = sum(parameter_components(training.model).values())
    rate, source, mfu = run_rate(training, gpu, project, parameters, peak_flops=peak_flops, mfu=mfu,
                                 cpu_flops=cpu_flops, measured_flops=measured_flops)
    return RunPlan(
        model_name=model_name(training.model), parameters=parameters, training=training, layout=layout,
        steps=steps, eval_tokens=eval_tokens, flops_per_token=flops_per_token(training.model, training.seq_len),
        memory=memory_plan(training, layout.micro_batch_size, grad_accum_steps=layout.grad_accum_steps,
                           context_counted=context_counted),
        steps_done=done, resume_tag=resume[0] if resume else None, context_counted=context_counted,
        capacity=capacity, capacity_source=capacity_source, gpu=gpu, largest=largest,
        suggestion=configured.in_micro_batches(largest[training.checkpointing]) if largest else None,
        rate=rate, rate_source=source, mfu=mfu, startup=startup_seconds(device, compile_model, op_build_pending))


def fitting_change(project: Project, plan: RunPlan) -> str:
    """The smallest change to the project that makes `plan` fit its capacity, in words with the keys to set:
    a smaller micro batch with more accumulation (the step unchanged), activation checkpointing, a higher
    ZeRO stage, on a GPU the optimizer state in CPU memory; or what is left when none does."""
    training, capacity = plan.training, plan.capacity
    assert capacity is not None, "a plan that does not fit was held against a capacity"
    per_rank = plan.layout.sequences_per_rank
    for checkpointing in (training.checkpointing, True):
        best = plan.layout.in_micro_batches(largest_micro_batch(training, capacity, checkpointing,
                                                                context_counted=plan.context_counted, per_rank=per_rank))
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
    if training.device == "cpu":  # offloading moves nothing there: the optimizer state is in CPU memory already
        return ("none of micro batch 1, activation checkpointing and ZeRO-3 fits: fewer ranks, a shorter "
                "train.seq_len or a smaller model (model.n_layer, n_embd, block_size)")
    offloaded = dataclasses.replace(training, zero_stage=3, checkpointing=True, offload_optimizer=True)
    if memory_plan(offloaded, 1, context_counted=plan.context_counted).required <= capacity:
        return ("deepspeed.zero_stage = 3 with deepspeed.offload_optimizer = true, activation checkpointing and a "
                "micro batch of 1")
    return "none of micro batch 1, activation checkpointing, ZeRO-3 and offloading fits: more GPUs, larger ones or a smaller model"
