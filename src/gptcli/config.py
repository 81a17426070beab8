"""The project file (`run.toml`): one dataclass per [section], with defaults and a line of doc per key.

Precedence, stated once: ``--set section.key=value`` > the project file > a `[model] preset` > the
defaults below. The same field docs feed `gpt init`'s commented file, `--help` and
docs/project-file.md (`python -m gptcli.config > docs/project-file.md`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

from .errors import GptError

DEFAULT_PROJECT_FILE = "run.toml"


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING):
    """A dataclass field carrying its one-line documentation."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class ConfigError(GptError):
    """A project file or override that does not fit the schema."""


# --- sections -------------------------------------------------------------------------------------


@dataclass
class ProjectConfig:
    """Naming, where runs go, and the seed everything else derives from."""

    name: str = doc("Name of this project, shown in logs and written into checkpoints.", "gpt")
    out_dir: str = doc("Run directory: checkpoints, metrics.jsonl, the consolidated model/.", "runs/gpt")
    seed: int = doc("Seed for weights, data order, dropout and sampling.", 1337)


@dataclass
class DataConfig:
    """Tokenization (`gpt prepare`) and the prepared shards training reads."""

    dir: str = doc("Directory of prepared shards (holds manifest.json).", "data/shards")
    tokenizer: str = doc('Tokenizer: "gpt2" (tiktoken GPT-2 BPE) or "openai-gpt" (GPT-1 BPE, needs vocab_dir).', "gpt2")
    vocab_dir: Optional[str] = doc(
        "Local vocabulary: a dir with vocab.bpe+encoder.json or merges.txt+vocab.json, or a .tiktoken file.", None
    )
    separator: str = doc('Document boundaries inside a text file: "none" (one per file), "blank-line" or "line".', "none")
    text_column: str = doc("Field holding the text in .jsonl records and datasets.", "text")
    val_fraction: float = doc("Fraction of documents held out for validation (chosen by a seeded hash).", 0.005)
    shard_tokens: int = doc("Tokens per shard file (the last one of each split is smaller).", 100_000_000)
    workers: int = doc("Tokenizer processes for `gpt prepare`; 0 means one per CPU core.", 0)

    def __post_init__(self):
        if self.tokenizer not in ("gpt2", "openai-gpt"):
            raise ConfigError(f'data.tokenizer must be "gpt2" or "openai-gpt", not "{self.tokenizer}".')
        if self.separator not in ("none", "blank-line", "line"):
            raise ConfigError(f'data.separator must be "none", "blank-line" or "line", not "{self.separator}".')
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), not {self.val_fraction}.")
        if self.shard_tokens < 1:
            raise ConfigError(f"data.shard_tokens must be positive, not {self.shard_tokens}.")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be 0 (all cores) or more, not {self.workers}.")


ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
ATTENTION_KINDS = ("causal", "bidirectional", "sliding_window")


@dataclass
class ModelConfig:
    """The architecture. GPT-1 vs GPT-2 is `norm_position` and `final_norm`, not a second model."""

    preset: Optional[str] = doc("Start from a named architecture (see `gpt inspect-params --list`); keys below override it.", None)
    vocab_size: int = doc("Vocabulary size the tokenizer produces (GPT-2 BPE: 50257).", 50257)
    block_size: int = doc("Context length: the most positions the model sees.", 1024)
    n_layer: int = doc("Number of transformer blocks.", 12)
    n_head: int = doc("Attention heads per block; n_embd must divide by it.", 12)
    n_embd: int = doc("Width of the residual stream.", 768)
    mlp_ratio: int = doc("MLP hidden width as a multiple of n_embd.", 4)
    norm_position: str = doc('"pre" (GPT-2: LayerNorm before each sublayer) or "post" (GPT-1: after the residual add).', "pre")
    final_norm: bool = doc("Final LayerNorm ln_f before the head (GPT-2: true, GPT-1: false).", True)
    bias: bool = doc("Biases in Linear layers and LayerNorms.", True)
    layer_norm_epsilon: float = doc("LayerNorm epsilon (GPT-2 and GPT-1 use 1e-5).", 1e-5)
    activation: str = doc('MLP activation: "gelu_new" (tanh approximation, GPT-2), "gelu", "relu" or "silu".', "gelu_new")
    position: str = doc('Position information: "learned" (wpe, as GPT-1/2) or "rotary" (RoPE, no wpe).', "learned")
    rope_base: float = doc("RoPE frequency base when position is rotary.", 10000.0)
    attention: str = doc('Default attention pattern: "causal", "bidirectional" or "sliding_window".', "causal")
    sliding_window: int = doc("Keys a query sees (itself included) when attention is sliding_window.", 256)
    tie_embeddings: bool = doc("Share the LM head with the token embedding wte (as GPT-1/2 do).", True)
    dropout: float = doc("Dropout on embeddings, attention probabilities and residual branches (GPT-2: 0.1).", 0.0)
    init_std: float = doc("Std of the normal init of weights; residual projections get init_std/sqrt(2*n_layer).", 0.02)
    vocab_multiple: int = doc("Pad the embedding rows to a multiple of this for faster matmuls; logits and counts stay exact.", 1)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be positive, not {getattr(self, name)}.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}).")
        if self.norm_position not in ("pre", "post"):
            raise ConfigError(f'model.norm_position must be "pre" or "post", not "{self.norm_position}".')
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, not \"{self.activation}\".")
        if self.position not in ("learned", "rotary"):
            raise ConfigError(f'model.position must be "learned" or "rotary", not "{self.position}".')
        if self.position == "rotary" and self.head_dim % 2:
            raise ConfigError(f"model.position rotary needs an even head dimension, not {self.head_dim}.")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_KINDS)}, not \"{self.attention}\".")
        if self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be positive, not {self.sliding_window}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), not {self.dropout}.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def architecture_dict(self) -> dict:
        """Keys that change the shape or meaning of the weights (compared on resume)."""
        ignore = {"preset", "dropout", "init_std", "attention", "sliding_window", "vocab_multiple"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}

    def fingerprint(self) -> str:
        blob = json.dumps(self.architecture_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = doc("Optimizer steps to run (the run ends at whichever of max_steps / max_tokens comes first).", 1000)
    max_tokens: int = doc("Token budget; 0 means no budget, max_steps alone decides.", 0)
    micro_batch_size: int = doc("Sequences per rank per forward pass.", 8)
    grad_accum_steps: int = doc("Micro batches accumulated per optimizer step (ignored when global_batch_tokens is set).", 1)
    global_batch_tokens: int = doc("Tokens per optimizer step over all ranks; 0 means micro batch x accumulation x ranks.", 0)
    seq_len: int = doc("Tokens per training sequence; 0 means the model's block_size.", 0)
    lr: float = doc("Peak learning rate.", 6e-4)
    min_lr: float = doc("Learning rate at the end of the decay.", 6e-5)
    lr_schedule: str = doc('Decay after warmup: "cosine", "linear" or "constant".', "cosine")
    warmup_steps: int = doc("Steps of linear warmup: step k (from 0) uses lr*(k+1)/warmup_steps, so the first uses lr/warmup_steps.", 100)
    weight_decay: float = doc("AdamW weight decay, applied to 2-D weight matrices only (not biases, norms, wpe).", 0.1)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.95)
    eps: float = doc("AdamW epsilon.", 1e-8)
    grad_clip: float = doc("Clip the global gradient norm to this; 0 disables clipping.", 1.0)
    eval_every: int = doc("Evaluate on the val shards every this many steps; 0 disables.", 100)
    eval_batches: int = doc("Micro batches per evaluation.", 20)
    checkpoint_every: int = doc("Save a checkpoint every this many steps (and always at the end); 0 = only at the end.", 500)
    keep_checkpoints: int = doc("Complete checkpoints to keep (at least 2); the one `latest` names is never deleted.", 3)
    sample_every: int = doc("Print a sample from sample_prompt every this many steps; 0 disables.", 0)
    sample_prompt: str = doc("Prompt for the periodic samples.", "In my opinion,")
    sample_tokens: int = doc("Tokens per periodic sample.", 48)
    log_every: int = doc("Refresh the live display every this many steps (metrics.jsonl gets every step).", 1)
    precision: str = doc('"auto" (bf16 on a GPU that has it, else fp32), "fp32", "bf16" or "fp16".', "auto")
    device: str = doc('"auto" (CUDA when present, else CPU), "cuda" or "cpu".', "auto")
    compile: Union[bool, str] = doc('torch.compile the model: "auto" (on with CUDA, off on the CPU), true or false.', "auto")
    activation_checkpointing: bool = doc("Recompute block activations in the backward pass to save memory.", False)
    shuffle: bool = doc("Visit training windows in a seeded random order (false: sequential).", True)
    tensorboard: bool = doc("Also write TensorBoard events into the run directory.", False)
    peak_tflops: float = doc("Peak TFLOP/s of one accelerator for MFU; 0 looks the GPU up by name (dense bf16 figures).", 0.0)

    def __post_init__(self):
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f'train.lr_schedule must be "cosine", "linear" or "constant", not "{self.lr_schedule}".')
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f'train.precision must be "auto", "fp32", "bf16" or "fp16", not "{self.precision}".')
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f'train.device must be "auto", "cuda" or "cpu", not "{self.device}".')
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be positive, not {getattr(self, name)}.")
        if self.keep_checkpoints < 2:
            raise ConfigError(f"train.keep_checkpoints must be at least 2, not {self.keep_checkpoints}.")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr}).")
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f'train.compile must be "auto", true or false, not "{self.compile}".')
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be 0 (look it up) or more, not {self.peak_tflops}.")


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed holds the model: ZeRO stage, offload, and any other DeepSpeed key."""

    zero_stage: int = doc("ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+ gradients), 3 (+ weights); with bf16 use 1+, as stage 0 sums gradients in bf16.", 1)
    offload_optimizer: bool = doc("Keep optimizer state in CPU memory (ZeRO 1-3).", False)
    offload_params: bool = doc("Keep parameters in CPU memory (ZeRO 3).", False)
    config: dict = doc("Passthrough: any other DeepSpeed config keys, merged over the generated config.", factory=dict)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}.")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage = 3.")


@dataclass
class EvalConfig:
    """`gpt eval`: perplexity on held-out text."""

    split: str = doc('Shards to score when no text is given: "val" or "train".', "val")
    text: Optional[str] = doc("A text file to score instead of the shards (tokenized on the fly).", None)
    stride: int = doc("Sliding-window stride in tokens; 0 means the full context (no overlap).", 0)
    batch_size: int = doc("Windows per forward pass.", 8)
    max_tokens: int = doc("Score at most this many tokens; 0 means all.", 0)

    def __post_init__(self):
        if self.split not in ("val", "train"):
            raise ConfigError(f'eval.split must be "val" or "train", not "{self.split}".')
        if self.stride < 0 or self.batch_size < 1 or self.max_tokens < 0:
            raise ConfigError("eval.stride and eval.max_tokens must be 0 or more and eval.batch_size positive.")


@dataclass
class GenerateConfig:
    """`gpt generate`: sampling defaults."""

    prompt: str = doc("Prompt used when none is given on the command line.", "In my opinion,")
    max_new_tokens: int = doc("Tokens to generate per sample.", 100)
    temperature: float = doc("Softmax temperature; 0 means greedy.", 0.8)
    top_k: int = doc("Sample from the k most likely tokens; 0 disables.", 50)
    top_p: float = doc("Nucleus sampling: smallest set of tokens with this much probability; 1.0 disables.", 1.0)
    num_samples: int = doc("Samples per prompt.", 1)
    seed: Optional[int] = doc("Seed for sampling; unset means project.seed.", None)
    stop: list = doc("Stop a sample when it produces any of these strings (end-of-text always stops).", factory=list)
    lookahead: int = doc("Greedy, one prompt, one sample: verify up to this many tokens guessed from earlier "
                         "text per forward pass (prompt lookup); same output, faster on repetitive text; 0 = off.", 0)

    def __post_init__(self):
        if self.lookahead < 0:
            raise ConfigError("generate.lookahead must be 0 or more.")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError("generate.temperature and generate.top_k must be 0 or more, generate.top_p in (0, 1].")
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ConfigError("generate.max_new_tokens and generate.num_samples must be positive.")


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

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in section_names()}


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Project) if not f.metadata.get("internal")]


def section_class(name: str) -> type:
    return typing.get_type_hints(Project)[name]


# --- validation -------------------------------------------------------------------------------------


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a table", list: "a list"}.get(origin or tp, str(tp))


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check one value against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:  # an unset optional key (TOML cannot say null, JSON model configs can)
            return None
        choices = [a for a in typing.get_args(tp) if a is not type(None)]
        fitting = [a for a in choices if isinstance(value, typing.get_origin(a) or a)]
        if len(choices) > 1 and not fitting:  # e.g. compile: true or "auto"
            raise ConfigError(f"{where} must be {_type_name(tp)}, not {value!r}.")
        return _coerce(where, value, (fitting or choices)[0])
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {value!r}.")
    if not isinstance(value, expected):
        shown = json.dumps(value) if isinstance(value, str) else repr(value)
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {shown}.")
    if expected is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings.")
    return value


def _build_section(name: str, values: dict) -> Any:
    cls = section_class(name)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f'Unknown key "{name}.{key}"{_nearest(key, known)}.')
        if isinstance(value, dict) and hints[key] is not dict:
            raise ConfigError(f'"{name}.{key}" is a table, but {name}.{key} must be {_type_name(hints[key])}.')
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def project_from_dict(raw: dict, source: Optional[str] = None) -> Project:
    """Validate a parsed project file (sections as dicts) into a Project."""
    sections = section_names()
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f'Unknown section "[{name}]"{_nearest(name, sections)}.')
        if not isinstance(value, dict):
            raise ConfigError(f'"{name}" must be a [{name}] table, not {value!r}.')
    model_values = dict(raw.get("model", {}))
    if model_values.get("preset") is not None:
        from .presets import preset_model_values

        model_values = {**preset_model_values(str(model_values["preset"])), **model_values}
    built = {name: _build_section(name, model_values if name == "model" else raw.get(name, {})) for name in sections}
    return Project(**built, source=source)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value); the value is read as TOML, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f'--set expects section.key=value, got "{text}".')
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f'--set expects section.key=value, got "{text}".')
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return parts[0], parts[1], value


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
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Project file {path} does not exist (create one with `gpt init`).") from None
    except IsADirectoryError:
        raise ConfigError(f"Project file {path} is a directory, not a TOML file.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Project file {path} is not valid TOML: {error}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Project file {path} is not UTF-8 text.") from None


def load_project(path: Optional[Path] = None, overrides: Optional[list[str]] = None) -> Project:
    """Load the project: `path`, else ./run.toml when present, else defaults; then `--set` overrides."""
    if path is None and Path(DEFAULT_PROJECT_FILE).is_file():
        path = Path(DEFAULT_PROJECT_FILE)
    raw = read_toml(Path(path)) if path is not None else {}
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
    lines = []
    for name in section_names():
        lines.append(f"[{name}]")
        for key, value in dataclasses.asdict(getattr(project, name)).items():
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def commented_template(preset: Optional[str] = None) -> str:
    """`gpt init`'s file: every key with its default and its one line of doc."""
    project = project_from_dict({"model": {"preset": preset}} if preset else {})
    lines = ["# gptcli project file. Every key is shown with its default; delete what you do not change.",
             "# Precedence: gpt ... --set section.key=value > this file > [model] preset > defaults.", ""]
    for name in section_names():
        section = getattr(project, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f'# {f.name} = ""  (unset)' if value is None else f"{f.name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def docs_markdown() -> str:
    """docs/project-file.md, generated from the dataclasses (a test keeps the file current)."""
    out = ["# The project file (`run.toml`)", "",
           "Generated from `src/gptcli/config.py` by `python -m gptcli.config`; do not edit by hand.", "",
           "Precedence: `--set section.key=value` > the project file > `[model] preset` > the defaults below.",
           "Unknown keys are errors that name `section.key` and the nearest valid key.", ""]
    for name in section_names():
        cls = section_class(name)
        out += [f"## [{name}]", "", (cls.__doc__ or "").strip(), "", "| key | default | meaning |", "|---|---|---|"]
        instance = cls()
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            shown = "unset" if value is None else toml_value(value)
            out.append(f"| `{f.name}` | `{shown}` | {f.metadata['doc']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(docs_markdown(), end="")
