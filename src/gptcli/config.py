"""The project file (`run.toml`): one dataclass per [section], with defaults and a line of doc per key.

Precedence, stated once: ``--set section.key=value`` (and the command-line options that stand for a key)
> the project file > a `[model] preset` (its [model] keys and, for the CPU-sized presets, [train] keys)
> the defaults below. The same field docs feed `gpt init`'s commented file, `--help` and
docs/project-file.md (`python -m gptcli.config > docs/project-file.md`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

from .batch import batch_layout
from .errors import GptError
from .parsing import TooLarge, loads_toml
from .paths import MIB, read_input_text
from .presets import hub_ids
from .registry import ATTENTION, FILE_REFERENCE, OBJECTIVES, OPTIMIZERS, TASKS, TRACKERS, Registry, reference_file

DEFAULT_PROJECT_FILE = "run.toml"
# A project file is a few kilobytes (gpt init's, every key commented, is about 10); anything near this is
# not one, and is refused before it is read into memory.
PROJECT_FILE_LIMIT = 4 * MIB
# The largest seed: TOML's largest integer (a signed 64-bit one). Seeds are offset by the rank and the
# step, and torch's generators take up to 2**64 - 1, so every seed derived from it stays valid.
MAX_SEED = 2**63 - 1


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
        at_least: Optional[float] = None, above: Optional[float] = None,
        below: Optional[float] = None, at_most: Optional[float] = None):
    """A dataclass field carrying its one-line documentation and the range its value must lie in."""
    bounds = {"at_least": at_least, "above": above, "below": below, "at_most": at_most}
    metadata = {"doc": text, "bounds": {k: v for k, v in bounds.items() if v is not None}}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _quoted(names) -> str:
    """Names as a doc line lists them: "a", "b"."""
    return ", ".join(f'"{name}"' for name in names)


class ConfigError(GptError):
    """A project file or override that does not fit the schema."""


class UnknownReference(ConfigError):
    """A key that names a registered thing (REGISTERED_KEYS) names none this Python has: not built in, not
    installed, not importable, or a file that is not there."""


class Section:
    """Base of every [section] dataclass. Building one checks each value against its annotation
    (type, choices, finiteness, range; see `_coerce`) and then the section's cross-field rules (`check`),
    so a section built from a file, from `--set` or in code is validated the same way, once."""

    section: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field]]  # every section is a dataclass

    def __post_init__(self):
        # A class is hashable; mypy checks a class object against Hashable with its instances' __hash__.
        hints = _field_hints(type(self))  # type: ignore[arg-type]
        for f in dataclasses.fields(self):
            value = _coerce(f"{self.section}.{f.name}", getattr(self, f.name), hints[f.name])
            _check_bounds(f"{self.section}.{f.name}", value, f.metadata.get("bounds", {}))
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between keys of this section; a section overrides this."""


# --- choices: the loader checks a value against these and names the nearest one --------------------

Tokenizer = Literal["gpt2", "openai-gpt"]
Separator = Literal["none", "blank-line", "line"]
NormPosition = Literal["pre", "post"]
Activation = Literal["gelu", "gelu_new", "relu", "silu"]
Position = Literal["learned", "rotary"]
# The attention pattern scaled_dot_product_attention runs without a mask (attention.CAUSAL). The planner,
# which imports no torch and no plugin, knows a pattern's mask by these names only: any other is planned as a
# materialised mask (a plugin that is plain causal too is planned on the safe side), one (T, T) mask for all
# rows for ONE_MASK_PATTERNS, else one per row (documents, an objective's draw, or a plugin: the safe side);
# on CUDA, BLOCK_MASK_PATTERNS run as FlexAttention block masks (attention.py gives them a mask_mod).
CAUSAL_PATTERN = "causal"
ONE_MASK_PATTERNS = frozenset({"bidirectional", "sliding_window"})
BLOCK_MASK_PATTERNS = frozenset({"sliding_window", "document", "document_sliding_window", "prefix"})
LrSchedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
TrainDevice = Literal["auto", "cuda", "cpu"]
ZeroStage = Literal[0, 1, 2, 3]
EvalSplit = Literal["val", "train"]
Compile = Literal["auto", True, False]
# `gpt train --resume`: a choice of one invocation, not a project key; the CLI, the train request and the
# loop all take this type and this default.
Resume = Literal["auto", "required", "never"]
DEFAULT_RESUME: Resume = "auto"


# --- sections -------------------------------------------------------------------------------------


@dataclass
class ProjectConfig(Section):
    """Naming, where runs go, and the seed everything else derives from."""

    section = "project"

    name: str = doc("Name of this project, shown in logs and written into checkpoints.", "gpt")
    out_dir: str = doc("Run directory: checkpoints, metrics.jsonl, the consolidated model/.", "runs/gpt")
    seed: int = doc("Seed for weights, data order, dropout and sampling.", 1337, at_least=0, at_most=MAX_SEED)


# A source's name is part of metric names ("eval_loss/books", "tokens/books"), columns and tracker keys.
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SourceEntry(Section):
    """One `[[data.sources]]` table: a prepared dir and its share of the training windows."""

    section = "data.sources"

    name: str = doc('How metrics, pre-flight and `gpt eval` name the source ("books": eval_loss/books); letters, '
                    "digits, _ . -.")
    dir: str = doc("Its `gpt prepare` output dir (holds manifest.json).")
    weight: float = doc("Its share of the training windows, before normalising (0.7 and 0.3, or 7 and 3).", 1.0,
                        above=0)

    def check(self) -> None:
        if not SOURCE_NAME.match(self.name):
            raise ConfigError(f"data.sources name {_shown(self.name)} must start with a letter or digit and hold only "
                              "letters, digits, _ . - (it names the source's metrics).")
        if not self.dir:
            raise ConfigError(f'data.sources "{self.name}" needs a dir: the `gpt prepare` output it reads.')


@dataclass
class DataConfig(Section):
    """Tokenization (`gpt prepare`) and the prepared shards training reads: one dir (`dir`), or a weighted
    mixture of several (`[[data.sources]]` tables, each `name`, `dir`, `weight`; docs/data.md)."""

    section = "data"

    dir: str = doc("Directory of prepared shards (holds manifest.json): what training reads when [[data.sources]] "
                   "is empty, and `gpt prepare`'s default --out.", "data/shards")
    sources: list[SourceEntry] = doc("A mixture: [[data.sources]] tables (name, dir, weight) training reads instead of "
                                     "dir; weights are normalised, each source keeps its own shuffled order and epochs.",
                                     factory=list)
    max_epochs: float = doc("The most times a mixture may repeat one of its sources over a run (pre-flight refuses "
                            "more); repeating data costs little up to about 4 epochs (Muennighoff et al. 2023).", 4.0,
                            above=0)
    allow_mixture_change: bool = doc("Resume a checkpoint whose [[data.sources]] (names, weights, data) differ from the "
                                     "project's: sources kept continue their order, new ones start, and RUN/mixture.json "
                                     "records the change (false: such a resume is refused).", False)
    tokenizer: Tokenizer = doc('Tokenizer: "gpt2" (tiktoken GPT-2 BPE) or "openai-gpt" (GPT-1 BPE, needs vocab_dir).', "gpt2")
    vocab_dir: Optional[str] = doc(
        "Local vocabulary: a dir with vocab.bpe+encoder.json or merges.txt+vocab.json, or a .tiktoken file.", None
    )
    separator: Separator = doc('Document boundaries inside a text file: "none" (one per file), "blank-line" or "line".', "none")
    text_column: str = doc("Field holding the text in .jsonl records and datasets.", "text")
    val_fraction: float = doc("Fraction of the corpus held out for validation: documents, or blocks of long ones, "
                              "drawn by a seeded hash.", 0.005, at_least=0, below=1)
    val_block_tokens: int = doc("Documents longer than this many tokens are split into blocks of it for the "
                                "train/val draw.", 2048, at_least=1)
    shard_tokens: int = doc("Tokens per shard file (the last one of each split is smaller).", 100_000_000, at_least=1)
    workers: int = doc("Tokenizer processes for `gpt prepare`; 0 means one per CPU core, and more than the cores "
                       "are cut to them.", 0, at_least=0)

    @property
    def directories(self) -> list[str]:
        """The prepared dirs training reads: each [[data.sources]] dir, else [data] dir."""
        return [entry.dir for entry in self.sources] or [self.dir]

    def check(self) -> None:
        names = [entry.name for entry in self.sources]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f'data.sources names "{twice[0]}" twice; each source needs a name of its own.')


@dataclass
class ModelConfig(Section):
    """The architecture. GPT-1 vs GPT-2 is `norm_position` and `final_norm`, not a second model."""

    section = "model"

    preset: Optional[str] = doc("Start from a named architecture (see `gpt inspect-params --list`); keys below override it. "
                                 "nano and tiny also bring [train] settings that suit their size.", None)
    vocab_size: int = doc("Vocabulary size the tokenizer produces (GPT-2 BPE: 50257).", 50257, at_least=1)
    block_size: int = doc("Context length: the most positions the model sees.", 1024, at_least=1)
    n_layer: int = doc("Number of transformer blocks.", 12, at_least=1)
    n_head: int = doc("Attention heads per block; n_embd must divide by it.", 12, at_least=1)
    n_embd: int = doc("Width of the residual stream.", 768, at_least=1)
    mlp_ratio: int = doc("MLP hidden width as a multiple of n_embd.", 4, at_least=1)
    norm_position: NormPosition = doc('"pre" (GPT-2: LayerNorm before each sublayer) or "post" (GPT-1: after the residual add).', "pre")
    final_norm: bool = doc("Final LayerNorm ln_f before the head (GPT-2: true, GPT-1: false).", True)
    bias: bool = doc("Biases in Linear layers and LayerNorms.", True)
    layer_norm_epsilon: float = doc("LayerNorm epsilon (GPT-2 and GPT-1 use 1e-5).", 1e-5, above=0)
    activation: Activation = doc('MLP activation: "gelu_new" (tanh approximation, GPT-2), "gelu", "relu" or "silu".', "gelu_new")
    position: Position = doc('Position information: "learned" (wpe, as GPT-1/2) or "rotary" (RoPE, no wpe).', "learned")
    rope_base: float = doc("RoPE frequency base when position is rotary.", 10000.0, above=0)
    attention: str = doc(f"Attention pattern: {_quoted(ATTENTION.builtins)}, a plugin's name, "
                         '"package.module:attr" or "file.py:attr" beside the project file; gpt train checks it fits '
                         "train.objective (docs/attention.md).", CAUSAL_PATTERN)
    sliding_window: int = doc("Keys a query sees (itself included) when attention is sliding_window or "
                              "document_sliding_window.", 256, at_least=1)
    eot_id: int = doc('The end-of-text token that ends a document for the "document" patterns (GPT-2\'s '
                      "<|endoftext|>: 50256); an id outside the vocabulary: no token ends one.", 50256, at_least=0)
    tie_embeddings: bool = doc("Share the LM head with the token embedding wte (as GPT-1/2 do).", True)
    dropout: float = doc("Dropout on embeddings, attention probabilities and residual branches (GPT-2: 0.1).", 0.0,
                         at_least=0, below=1)
    init_std: float = doc("Std of the normal init of weights; residual projections get init_std/sqrt(2*n_layer).", 0.02,
                          above=0)
    vocab_multiple: int = doc("Pad the embedding rows to a multiple of this for faster matmuls; logits and counts stay exact.", 1,
                              at_least=1)

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}).")
        if self.position == "rotary" and self.head_dim % 2:
            raise ConfigError(f"model.position rotary needs an even head dimension, not {self.head_dim}.")
        check_registered(ATTENTION, "model.attention", self.attention)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def architecture_dict(self) -> dict:
        """Keys that change the shape or meaning of the weights (compared on resume)."""
        ignore = {"preset", "dropout", "init_std", "attention", "sliding_window", "vocab_multiple", "eot_id"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}

    def fingerprint(self) -> str:
        blob = json.dumps(self.architecture_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class TrainConfig(Section):
    """The optimisation loop."""

    section = "train"

    max_steps: int = doc("Optimizer steps to run (the run ends at whichever of max_steps / max_tokens comes first).", 1000,
                         at_least=1)
    max_tokens: int = doc("Token budget; 0 means no budget, max_steps alone decides.", 0, at_least=0)
    micro_batch_size: int = doc("Sequences per rank per forward pass.", 8, at_least=1)
    grad_accum_steps: int = doc("Micro batches accumulated per optimizer step (ignored when global_batch_tokens is set).", 1,
                                at_least=1)
    global_batch_tokens: int = doc("Tokens per optimizer step over all ranks; 0 means micro batch x accumulation x ranks.", 0,
                                   at_least=0)
    seq_len: int = doc("Tokens per training sequence; 0 means the model's block_size.", 0, at_least=0)
    lr: float = doc("Peak learning rate.", 6e-4, above=0)
    min_lr: float = doc("Learning rate at the end of the decay.", 6e-5, at_least=0)
    lr_schedule: LrSchedule = doc('Decay after warmup: "cosine", "linear" or "constant".', "cosine")
    warmup_steps: int = doc("Steps of linear warmup: step k (from 0) uses lr*(k+1)/warmup_steps, so the first "
                             "uses lr/warmup_steps.", 100, at_least=0)
    optimizer: str = doc('The optimizer: "adamw" or "muon" (built in: Muon on the blocks\' matrices, AdamW on the rest; '
                         'docs/training.md), a plugin\'s name, "package.module:attr" or "file.py:attr" beside the '
                         "project file (docs/extending.md).", "adamw")
    optimizer_options: dict = doc("The optimizer's own settings, for one that declares them, e.g. { momentum = 0.9 }; "
                                  "adamw has none (it reads lr, beta1, beta2, eps, weight_decay); muon's are lr, "
                                  "momentum, weight_decay and ns_method (docs/training.md).", factory=dict)
    objective: str = doc(f"What the model learns to predict: {_quoted(OBJECTIVES.builtins)}, a plugin's name or a "
                         "reference; each fits the attention patterns the leak check accepts (docs/attention.md).",
                         "next_token")
    objective_options: dict = doc("The objective's own settings, e.g. { min_condition_fraction = 0.1 } for "
                                  "conditional (docs/attention.md lists each objective's).", factory=dict)
    weight_decay: float = doc("Decoupled weight decay, on the parameters the optimizer's grouping decays (adamw: 2-D "
                              "weight matrices only, not biases, norms, wpe).", 0.1, at_least=0)
    beta1: float = doc("AdamW's beta1 (train.optimizer = \"adamw\"; another optimizer reads it only if it says so).",
                       0.9, at_least=0, below=1)
    beta2: float = doc("AdamW's beta2 (as beta1).", 0.95, at_least=0, below=1)
    eps: float = doc("AdamW's epsilon (as beta1).", 1e-8, above=0)
    grad_clip: float = doc("Clip the global gradient norm to this; 0 disables clipping.", 1.0, at_least=0)
    eval_every: int = doc("Evaluate on the val shards every this many steps; 0 disables.", 100, at_least=0)
    eval_batches: int = doc("Micro batches per evaluation.", 20, at_least=1)
    checkpoint_every: int = doc("Save a checkpoint every this many steps (and always at the end); 0 = only at the end.", 500,
                                at_least=0)
    keep_checkpoints: int = doc("Complete checkpoints to keep (at least 2); the one `latest` names is never deleted.", 3,
                                at_least=2)
    sample_every: int = doc("Print a sample from sample_prompt every this many steps, picked as [generate] says "
                            "(temperature, top_k, top_p, stop); 0 disables.", 0, at_least=0)
    sample_prompt: str = doc("Prompt for the periodic samples.", "In my opinion,")
    sample_tokens: int = doc("Tokens per periodic sample.", 48, at_least=1)
    log_every: int = doc("Refresh the live display every this many steps (metrics.jsonl gets every step).", 1, at_least=1)
    precision: Precision = doc('"auto" (bf16 on a GPU that has it, else fp32), "fp32", "bf16" or "fp16".', "auto")
    device: TrainDevice = doc('"auto" (CUDA when present, else CPU), "cuda" or "cpu".', "auto")
    compile: Compile = doc('torch.compile the model: "auto" (on with CUDA, off on the CPU), true or false.', "auto")
    activation_checkpointing: bool = doc("Recompute block activations in the backward pass to save memory.", False)
    shuffle: bool = doc("Visit training windows in a seeded random order (false: sequential).", True)
    trackers: list = doc(f"Also log the run to these: {_quoted(TRACKERS.builtins)} (any subset; each needs its "
                         'package: pip install "gptcli[wandb]"), or a plugin\'s tracker (docs/extending.md).',
                         factory=list)
    tracker_project: str = doc('W&B project / MLflow experiment; "" means WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME '
                               'when set, else project.name.', "")
    tracker_run_name: str = doc('Run name in W&B and MLflow; "" means WANDB_NAME (W&B) when set, else the run '
                                'directory\'s name.', "")
    tensorboard: bool = doc('Older spelling of trackers = ["tensorboard"]; still honoured.', False)
    peak_tflops: float = doc("Peak TFLOP/s of one accelerator for MFU; 0 looks the GPU up by name (dense bf16 figures).", 0.0,
                             at_least=0)
    init_from: Optional[str] = doc("Start from these weights, not a random init: a model dir (`gpt load-hf`'s, or a run's "
                                   f"model/), a run dir, or a name gpt load-hf fetches ({', '.join(hub_ids())}); "
                                   "[model] comes from its config. A resumed run continues from its own checkpoints.",
                                   None)
    init_from_sha256: Optional[str] = doc("The sha256 init_from's weights file must have; unset: not checked "
                                          "(config.resolved.toml records the one used).", None)
    memory_check: bool = doc("Refuse to start when the planned memory does not fit: per GPU against its free memory, "
                             "on the CPU each rank of this machine against its share of the free memory (false: "
                             "start anyway).", True)

    def check(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr}).")
        check_registered(OPTIMIZERS, "train.optimizer", self.optimizer)
        check_registered(OBJECTIVES, "train.objective", self.objective)


@dataclass
class DeepSpeedConfig(Section):
    """How DeepSpeed holds the model: ZeRO stage, offload, and any other DeepSpeed key."""

    section = "deepspeed"

    zero_stage: ZeroStage = doc("ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+ gradients), 3 (+ weights); with bf16 use 1+, as stage 0 sums "
                                   "gradients in bf16.", 1)
    offload_optimizer: bool = doc("Keep optimizer state in CPU memory (ZeRO 1-3).", False)
    offload_params: bool = doc("Keep parameters in CPU memory (ZeRO 3).", False)
    config: dict = doc("Passthrough: any other DeepSpeed config keys, merged over the generated config.", factory=dict)

    def check(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage = 3.")


@dataclass
class EvalConfig(Section):
    """`gpt eval`: perplexity on held-out text, and benchmarks (`--task`; also during training)."""

    section = "eval"

    split: EvalSplit = doc('Shards to score when no text is given: "val" or "train".', "val")
    text: Optional[str] = doc("A text file to score instead of the shards (tokenized on the fly).", None)
    stride: int = doc("Sliding-window stride in tokens; 0 means the full context (no overlap).", 0, at_least=0)
    batch_size: int = doc("Windows (perplexity) or task examples per forward pass.", 8, at_least=1)
    max_tokens: int = doc("Score at most this many tokens (of each source, for a mixture's split); 0 means all.", 0,
                          at_least=0)
    tasks: list = doc(f"Benchmarks scored as lm-evaluation-harness scores them: {_quoted(TASKS.builtins)}, a group "
                      f"of them ({_quoted(TASKS.groups)}), or a plugin's task (docs/extending.md); during training "
                      "every tasks_every steps, and by `gpt eval --task` (whose names replace these).", factory=list)
    tasks_every: int = doc("Score the tasks during training every this many steps (and at the last); 0 = at every "
                           "evaluation (train.eval_every).", 0, at_least=0)
    tasks_limit: int = doc("Score the first N examples of each task; 0 = all (HellaSwag 10,042, LAMBADA 5,153).", 0,
                           at_least=0)
    splits: Optional[str] = doc("Conditional evaluation splits for `gpt eval` to score (a conditional or masked_lm "
                                "run): the file `gpt eval --write-splits N` wrote, so models meet the same sets.",
                                None)
    seed: Optional[int] = doc("Seed of an objective's draws in `gpt eval` (prefix, hidden tokens, conditional sets) "
                              "and of --write-splits; unset means project.seed.", None, at_least=0, at_most=MAX_SEED)
    task_data: dict = doc('Local data per task, e.g. { hellaswag = "hellaswag_val.jsonl" }: JSONL or Parquet with '
                          "the Hub dataset's fields; other tasks come from the Hub through datasets (cached).",
                          factory=dict)

    def check(self) -> None:
        # Each name is checked against the registry by Project, which knows the project file's directory.
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("eval.tasks names a task twice.")
        for name, path in self.task_data.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(f"eval.task_data.{name} must be the path of a file, not {_shown(path)}.")


@dataclass
class GenerateConfig(Section):
    """`gpt generate`: sampling defaults."""

    section = "generate"

    prompt: str = doc("Prompt used when none is given on the command line.", "In my opinion,")
    max_new_tokens: int = doc("Tokens to generate per sample.", 100, at_least=1)
    temperature: float = doc("Softmax temperature; 0 means greedy.", 0.8, at_least=0)
    top_k: int = doc("Sample from the k most likely tokens; 0 disables.", 50, at_least=0)
    top_p: float = doc("Nucleus sampling: smallest set of tokens with this much probability; 1.0 disables.", 1.0,
                       above=0, at_most=1)
    num_samples: int = doc("Samples per prompt.", 1, at_least=1)
    seed: Optional[int] = doc("Seed for sampling; unset means project.seed.", None, at_least=0, at_most=MAX_SEED)
    stop: list = doc("Stop a sample when it produces any of these strings (end-of-text always stops).", factory=list)
    lookahead: int = doc("Greedy, one prompt, one sample: verify up to this many tokens guessed from earlier "
                         "text per forward pass (prompt lookup); same output, faster on repetitive text; 0 = off.", 0,
                         at_least=0)


@dataclass
class Project:
    """The whole project file."""

    project: ProjectConfig = field(default_factory=ProjectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    source: Optional[str] = field(default=None, repr=False, compare=False, metadata={"internal": True})
    # "section.key" of every key the project file, --set or a preset set (the others are defaults).
    given: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})

    def __post_init__(self):
        """Rules between sections: checked when the project is loaded, not minutes into a run."""
        self.place_references()
        model, train = self.model, self.train
        if train.optimizer_options:
            from .optimizers import optimizer_spec

            try:
                optimizer_spec(train.optimizer).check_options(train.optimizer_options)
            except GptError as error:
                raise ConfigError(str(error)) from None
        if train.objective_options:
            from .objectives import objective_spec

            try:
                objective_spec(train.objective).check_options(train.objective_options)
            except GptError as error:
                raise ConfigError(str(error)) from None
        seq_len = self.seq_len
        if seq_len > model.block_size and model.position == "learned":
            raise ConfigError(f"train.seq_len ({seq_len}) exceeds model.block_size ({model.block_size}): learned "
                              "positions (model.position) cover block_size tokens only.")
        try:
            batch_layout(train, seq_len)  # the ranks are not known yet: what holds for any number of them
        except GptError as error:
            raise ConfigError(str(error)) from None

    @property
    def reference_dir(self) -> Optional[Path]:
        """The directory "file.py:attr" references are relative to: the project file's (None: the working
        directory, for a project without a file)."""
        return Path(self.source).parent if self.source is not None else None

    def place_references(self) -> None:
        """Every key that names a registered thing (REGISTERED_KEYS) names one this Python has, checked
        without importing it; a "file.py:attr" is read beside the project file (the working directory without
        one), checked there and made absolute, so the model, the engine, every rank, a resume and a model
        dir's config.json find the same file wherever they run."""
        base = self.reference_dir or Path.cwd()
        for section, key, registry in REGISTERED_KEYS:
            values = getattr(self, section)
            setattr(values, key, placed(getattr(values, key), registry, f"{section}.{key}", base))

    @property
    def seq_len(self) -> int:
        """Tokens per training sequence: train.seq_len, or the model's block_size when that is 0."""
        return self.train.seq_len or self.model.block_size

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in section_names()}


# The keys that name a registered thing (registry.py), by section: a name or reference, a list of them, or a
# table keyed by them.
REGISTERED_KEYS: tuple[tuple[str, str, Registry], ...] = (
    ("model", "attention", ATTENTION), ("train", "optimizer", OPTIMIZERS), ("train", "trackers", TRACKERS),
    ("train", "objective", OBJECTIVES), ("eval", "tasks", TASKS), ("eval", "task_data", TASKS))


def placed(value: Any, registry: Registry, where: str, base: Path) -> Any:
    """`value` with each name checked and each "file.py:attr" made absolute (a list's items, a table's keys);
    in a list, a group's name (registry.Registry.groups: `eval.tasks = ["all"]`) becomes its members."""
    if isinstance(value, list):
        return [placed(item, registry, where, base) for item in registry.expand(value)]
    if isinstance(value, dict):
        return {placed(name, registry, where, base): item for name, item in value.items()}
    try:
        registry.check(value, where, base)
    except GptError as error:
        raise UnknownReference(str(error)) from None
    match = FILE_REFERENCE.match(value)
    if not match:
        return value
    return f"{reference_file(match.group('file'), base).absolute()}:{match.group('attr')}"


def check_registered(registry: Registry, where: str, value: str) -> None:
    """A name or "module:attr" reference the registry knows, checked without importing anything; a
    "file.py:attr" one is checked by the Project, which knows the project file's directory."""
    if isinstance(value, str) and FILE_REFERENCE.match(value):
        return
    try:
        registry.check(value, where)
    except GptError as error:
        raise UnknownReference(str(error)) from None


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Project) if not f.metadata.get("internal")]


def section_class(name: str) -> type:
    return typing.get_type_hints(Project)[name]


# --- validation -------------------------------------------------------------------------------------


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


@cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return _type_name(type(typing.get_args(tp)[0]))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a table", list: "a list"}.get(origin or tp, str(tp))


def _shown(value: Any) -> str:
    """A value as TOML writes it: "text", true, 3."""
    return json.dumps(value) if isinstance(value, (str, bool)) else repr(value)


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check one value against its annotation and return it in that type: ints are accepted where floats
    are expected, a float must be finite, a Literal choice must be one of its values."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:  # an unset optional key (TOML cannot say null, JSON model configs can)
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(where, value, inner)
    if origin is Literal:
        return _choose(where, value, tp)
    table = _table_class(tp) if origin is list else None
    if table is not None:
        return _tables(where, value, table)
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, tuple):
        value = list(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {_shown(value)}.")
    if not isinstance(value, expected):
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {_shown(value)}.")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value}.")
    if expected is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings.")
    return value


def _table_class(tp: Any) -> Optional[type]:
    """The dataclass of a list-of-tables key (`list[SourceEntry]`: `[[data.sources]]`), else None."""
    args = typing.get_args(tp)
    cls = args[0] if len(args) == 1 else None
    return cls if isinstance(cls, type) and dataclasses.is_dataclass(cls) else None


def _tables(where: str, value: Any, cls: type) -> list:
    """A list of tables, each built as its dataclass: unknown keys named with the nearest valid one, each
    value checked against its field where the message names the table by its place ("data.sources[2].weight")."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of tables ([[{where}]]), not {_shown(value)}.")
    hints, fields = _field_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    built = []
    for number, item in enumerate(value, start=1):
        if isinstance(item, cls):
            built.append(item)
            continue
        place = f"{where}[{number}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{place} must be a table ([[{where}]]), not {_shown(item)}.")
        missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and name not in item]
        if missing:
            raise ConfigError(f'{place} has no "{missing[0]}" key; every [[{where}]] table needs one.')
        for key, field_value in item.items():
            if key not in fields:
                raise ConfigError(f'Unknown key "{place}.{key}"{_nearest(key, list(fields))}.')
            checked = _coerce(f"{place}.{key}", field_value, hints[key])
            _check_bounds(f"{place}.{key}", checked, fields[key].metadata.get("bounds", {}))
        built.append(cls(**item))
    return built


def _choose(where: str, value: Any, tp: Any) -> Any:
    """A choice field: the value must be one of the Literal's values; the error lists them all."""
    choices = typing.get_args(tp)
    kinds = {type(c) for c in choices}
    if type(value) not in kinds and len(kinds) == 1:
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {_shown(value)}.")
    if not any(type(value) is type(c) and value == c for c in choices):
        allowed = ", ".join(_shown(c) for c in choices)
        hint = _nearest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{where} must be one of {allowed}, not {_shown(value)}{hint}.")
    return value


def _check_bounds(where: str, value: Any, bounds: dict) -> None:
    """A number outside its field's range names the key, the range and the value."""
    if value is None or not bounds:
        return
    low_ok = value >= bounds["at_least"] if "at_least" in bounds else value > bounds.get("above", -math.inf)
    high_ok = value < bounds["below"] if "below" in bounds else value <= bounds.get("at_most", math.inf)
    if low_ok and high_ok:
        return
    raise ConfigError(f"{where} must be {_range_text(bounds)}, not {value}.")


def _range_text(bounds: dict) -> str:
    def number(x: float) -> str:
        return f"{x:,}" if isinstance(x, int) and abs(x) >= 1e6 else f"{x:g}"

    low = ("[", bounds["at_least"]) if "at_least" in bounds else ("(", bounds["above"]) if "above" in bounds else None
    high = (")", bounds["below"]) if "below" in bounds else ("]", bounds["at_most"]) if "at_most" in bounds else None
    if low and high:
        return f"in {low[0]}{number(low[1])}, {number(high[1])}{high[0]}"
    if low == ("[", 0):
        return "0 or more"
    if low == ("(", 0):
        return "more than 0"
    if low:
        return f"at least {number(low[1])}" if low[0] == "[" else f"more than {number(low[1])}"
    assert high is not None, bounds  # a range has a bound on one side at least
    return f"less than {number(high[1])}" if high[0] == ")" else f"at most {number(high[1])}"


def field_doc(section: str, key: str) -> str:
    """The one line of documentation of `section.key` (the text `gpt init`, --help and docs/ show)."""
    fields = {f.name: f for f in dataclasses.fields(section_class(section))}
    return fields[key].metadata["doc"]


def allowed_values(section: str, key: str) -> str:
    """What `section.key` accepts, in words: its choices, its range, or its type."""
    registered = {(name, field_name): registry for name, field_name, registry in REGISTERED_KEYS}
    if (section, key) in registered:
        return f"{', '.join(registered[section, key].builtins)}, a plugin's name, or a reference"
    cls = section_class(section)
    tp = _field_hints(cls)[key]
    table = _table_class(tp) if typing.get_origin(tp) is list else None
    if table is not None:
        return f"[[{section}.{key}]] tables of {', '.join(f.name for f in dataclasses.fields(table))} (below)"
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    if typing.get_origin(args[0]) is Literal:
        return ", ".join(_shown(c) for c in typing.get_args(args[0]))
    return field_range(section, key) or _type_name(tp)


def field_range(section: str, key: str) -> Optional[str]:
    """The range `section.key` must lie in, in words ("in [0, 1)", "at least 1"); None for an unbounded key."""
    bounds = {f.name: f for f in dataclasses.fields(section_class(section))}[key].metadata.get("bounds")
    return _range_text(bounds) if bounds else None


def _build_section(name: str, values: dict) -> Any:
    """A section from its TOML table; building it validates every value (Section.__post_init__)."""
    cls = section_class(name)
    hints = _field_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f'Unknown key "{name}.{key}"{_nearest(key, known)}.')
        if isinstance(value, dict) and hints[key] is not dict:
            raise ConfigError(f'"{name}.{key}" is a table, but {name}.{key} must be {_type_name(hints[key])}.')
    return cls(**values)


def project_from_dict(raw: dict, source: Optional[str] = None) -> Project:
    """Validate a parsed project file (sections as dicts) into a Project."""
    sections = section_names()
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f'Unknown section "[{name}]"{_nearest(name, sections)}.')
        if not isinstance(value, dict):
            raise ConfigError(f'"{name}" must be a [{name}] table, not {value!r}.')
    tables = {name: dict(raw.get(name, {})) for name in sections}
    preset = tables["model"].get("preset")
    if preset is not None:
        from .presets import get_preset

        # A preset sits between the defaults and the file: the file's keys override it.
        for name, values in get_preset(str(preset)).sections().items():
            tables[name] = {**values, **tables[name]}
    built = {name: _build_section(name, tables[name]) for name in sections}
    given = frozenset(f"{name}.{key}" for name in sections for key in tables[name])
    return Project(**built, source=source, given=given)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value); the value is read as TOML, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f'--set expects section.key=value, got "{text}".')
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f'--set expects section.key=value, got "{text}".')
    try:
        value = loads_toml(f"v = {raw_value.strip()}")["v"]
    except TooLarge as bound:
        raise ConfigError(f"--set {dotted.strip()}: the value is not read: {bound}.") from None
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return parts[0], parts[1], value


def option_overrides(section: str, values: dict[str, Any]) -> list[str]:
    """Command-line options that stand for [section] keys, as `--set` overrides (None = not given), so
    they are validated by the schema like any other override."""
    return [f"{section}.{key}={toml_value(value)}" for key, value in values.items() if value is not None]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    merged = {name: dict(values) if isinstance(values, dict) else values for name, values in raw.items()}
    sections = section_names()
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in sections:
            raise ConfigError(f'Unknown section "{section}" in --set {text}{_nearest(section, sections)}.')
        merged.setdefault(section, {})[key] = value
    return merged


def read_toml(path: Path) -> dict:
    """A project file: a regular file of at most PROJECT_FILE_LIMIT bytes (paths.py: never a device or a FIFO),
    parsed within the bounds of parsing.py."""
    if not Path(path).exists():
        raise ConfigError(f"Project file {path} does not exist (create one with `gpt init`).")
    if Path(path).is_dir():
        raise ConfigError(f"Project file {path} is a directory, not a TOML file.")
    text = read_input_text(path, "Project file", PROJECT_FILE_LIMIT)
    try:
        return loads_toml(text)
    except TooLarge as bound:
        raise ConfigError(f"Project file {path} is not read: {bound}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Project file {path} is not valid TOML: {error}.") from None


def project_file(path: Optional[Path | str] = None) -> Optional[Path]:
    """The project file a command reads: `path`, else ./run.toml when present, else none (the defaults)."""
    if path is not None:
        return Path(path)
    return Path(DEFAULT_PROJECT_FILE) if Path(DEFAULT_PROJECT_FILE).is_file() else None


def load_project(path: Optional[Path] = None, overrides: Optional[list[str]] = None) -> Project:
    """Load the project: `path`, else ./run.toml when present, else defaults; then `--set` overrides."""
    path = project_file(path)
    raw = read_toml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return project_from_dict(raw, source=str(path) if path is not None else None)


# --- writing ------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def dump_toml(project: Project) -> str:
    """The resolved project as TOML (unset optional keys are left out)."""
    return sections_toml(project.to_dict())


def sections_toml(sections: dict) -> str:
    """{section: {key: value}} (Project.to_dict's shape) as TOML; other top-level entries are left out."""
    lines = []
    for name, values in sections.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def _preset_keys() -> dict[str, set[str]]:
    """The keys some preset sets, by section: `gpt init` writes these as comments so that changing
    `preset` changes them too (a key written out would pin its value whatever the preset)."""
    from .presets import PRESETS

    keys: dict[str, set[str]] = {}
    for preset in PRESETS.values():
        for name, values in preset.sections().items():
            keys.setdefault(name, set()).update(values)
    keys["model"] = {f.name for f in dataclasses.fields(ModelConfig)} - {"preset"}
    return keys


def commented_template(preset: Optional[str] = None) -> str:
    """`gpt init`'s file: every key with the value in effect and its one line of doc.

    Keys a preset decides (all of [model], the [train] keys some preset sets) are written commented out,
    so editing `preset` takes effect; uncommenting one pins it."""
    from .presets import PRESETS

    project = project_from_dict({"model": {"preset": preset}} if preset else {})
    follows_preset = _preset_keys()
    lines = ["# gptcli project file: every key with the value in effect and what it does.",
             "# Precedence: gpt ... --set section.key=value > this file > [model] preset > defaults.",
             "# Keys written as comments follow the preset (or the defaults); uncomment a key to set it.", ""]
    for name in section_names():
        section = getattr(project, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            lines.append(f"# {f.metadata['doc']}")
            if f.name == "preset" and value is None:
                lines.append(f'# preset = "gpt2"    # unset; one of {", ".join(PRESETS)}')
            elif value is None:
                lines.append(f'# {f.name} = ""    # unset')
            elif value == [] and _table_class(_field_hints(section_class(name))[f.name]) is not None:
                # As tables after the section's keys ([[data.sources]] name = ..., dir = ..., weight = ...); a
                # `sources = []` written out would clash with the tables a user adds.
                lines.append(f'# {f.name} = []    # or [[{name}.{f.name}]] tables, e.g. name = "books", '
                             'dir = "data/books", weight = 0.7')
            elif f.name in follows_preset.get(name, ()):
                lines.append(f"# {f.name} = {toml_value(value)}")
            else:
                lines.append(f"{f.name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def write_template(directory: Path | str, preset: Optional[str] = None, force: bool = False) -> Path:
    """`gpt init`: write DIR/run.toml (the commented template); refuse to overwrite one unless `force`."""
    from .fsutil import atomic_write_text

    directory = Path(directory)
    text = commented_template(preset)  # an unknown preset fails here, before anything is written
    target = directory / DEFAULT_PROJECT_FILE
    _check_directory(directory)
    if target.is_dir():
        raise ConfigError(f"{target} is a directory; gpt init writes a file of that name.")
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists (use --force to overwrite it).")
    try:
        atomic_write_text(target, text)
    except OSError as error:
        raise ConfigError(f"Cannot write {target}: {error.strerror or error}.") from None
    return target


def _check_directory(directory: Path) -> None:
    """DIR must be a directory, or creatable as one (no file on its path)."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file, not a directory; give gpt init a directory to write run.toml into.")
    for ancestor in directory.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ConfigError(f"Cannot create {directory}: {ancestor} is a file, not a directory.")
            return


def docs_markdown() -> str:
    """docs/project-file.md, generated from the dataclasses (a test keeps the file current)."""
    out = ["# The project file (`run.toml`)", "",
           "Generated from `src/gptcli/config.py` by `python -m gptcli.config`; do not edit by hand.", "",
           "Precedence: `--set section.key=value` > the project file > `[model] preset` > the defaults below.",
           "A preset sets [model] keys and, for the CPU-sized presets, [train] keys that suit the model's size.",
           "Unknown keys and values outside `allowed` are errors that name `section.key` (and the nearest valid",
           "key or choice); so are rules between keys, such as `train.seq_len` <= `model.block_size`.", ""]
    for name in section_names():
        cls = section_class(name)
        out += [f"## [{name}]", "", (cls.__doc__ or "").strip(), "",
                "| key | default | allowed | meaning |", "|---|---|---|---|"]
        instance = cls()
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            shown = "unset" if value is None else toml_value(value)
            out.append(f"| `{f.name}` | `{shown}` | {allowed_values(name, f.name)} | {f.metadata['doc']} |")
        out.append("")
        out += _tables_markdown(name, cls)
    return "\n".join(out + _presets_markdown())


def _tables_markdown(section: str, cls: type) -> list[str]:
    """The keys of each list-of-tables key of a section (`[[data.sources]]`), as a table of their own."""
    out = []
    for f in dataclasses.fields(cls):
        table = _table_class(_field_hints(cls)[f.name]) if typing.get_origin(_field_hints(cls)[f.name]) is list else None
        if table is None:
            continue
        out += [f"### [[{section}.{f.name}]]", "", (table.__doc__ or "").strip(), "",
                "| key | default | allowed | meaning |", "|---|---|---|---|"]
        hints = _field_hints(table)
        for entry in dataclasses.fields(table):
            required = entry.default is dataclasses.MISSING
            shown = "required" if required else f"`{toml_value(entry.default)}`"
            bounds = entry.metadata.get("bounds")
            allowed = _range_text(bounds) if bounds else _type_name(hints[entry.name])
            out.append(f"| `{entry.name}` | {shown} | {allowed} | {entry.metadata['doc']} |")
        out.append("")
    return out


def _presets_markdown() -> list[str]:
    from .presets import PRESETS

    out = ["## Presets", "", "`[model] preset = NAME` sets these keys below the file's own (`gpt inspect-params "
           "--list` describes them; `gpt init --preset NAME` writes them as comments).", "",
           "| preset | [model] keys | [train] keys |", "|---|---|---|"]
    for preset in PRESETS.values():
        model = ", ".join(f"{k} = {toml_value(v)}" for k, v in preset.model.items())
        train = ", ".join(f"{k} = {toml_value(v)}" for k, v in preset.train.items()) or "(the defaults)"
        out.append(f"| `{preset.name}` | {model} | {train} |")
    return out + [""]


if __name__ == "__main__":
    print(docs_markdown(), end="")
