"""Hugging Face weights in (`gpt load-hf`) and out (`gpt export-hf`).

Two layouts, both read from config.json's `model_type`:
  gpt2        GPT2LMHeadModel (gpt2, gpt2-medium/-large/-xl, distilgpt2, or any shape): pre-LN, ln_f.
  openai-gpt  OpenAIGPTLMHeadModel (GPT-1): post-LN, no final LayerNorm, 512 positions.

The key map is short because gptcli keeps GPT-2's names (model.py):
  - a leading `transformer.` is dropped (GPT2LMHeadModel nests the body under it); `lm_head.weight` is
    top level and, when embeddings are tied, absent or equal to `wte.weight`;
  - GPT-1 only: `tokens_embed.weight` ↔ `wte.weight`, `positions_embed.weight` ↔ `wpe.weight`;
  - HF's Conv1D stores (in, out), nn.Linear (out, in): the four TRANSPOSED weights are transposed;
  - the causal-mask buffers `h.N.attn.bias` and `h.N.attn.masked_bias` are not weights and are skipped,
    matched exactly (a looser "ends with attn.bias" rule also drops `attn.c_attn.bias`, and the model
    then generates "model model model ...").
Everything else must match name and shape exactly; any missing, unexpected or wrongly shaped tensor is
one error that lists them. Nothing is ever left randomly initialised: the model is built on the meta
device and every tensor is assigned from the file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, ModelConfig, project_from_dict
from .errors import GptError
from .fsutil import publish_dir

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT1_RENAMES = {"tokens_embed.weight": "wte.weight", "positions_embed.weight": "wpe.weight"}
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # matched against the whole name
BODY_PREFIX = "transformer."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
VERIFY_TOLERANCE = 1e-4  # max |logit difference| in fp32; fp32 reorderings stay below ~1e-5 here

# HF activation names → gptcli's. GPT-2 names them as transformers' ACT2FN does; GPT-1's `afn`
# "gelu" is the tanh approximation (modeling_openai's ACT_FNS maps it to gelu_new).
GPT2_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu",
                    "silu": "silu", "swish": "silu"}
GPT1_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}

# One English paragraph for --verify: real words, so the comparison exercises real token statistics.
VERIFY_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk, counting the steps as his father "
    "had taught him. From the top he could see the harbour, the fishing boats returning with their catch, "
    "and the long grey line of the cliffs where the gulls nested in spring. He wrote the weather in a "
    "leather book: wind from the west, light rain, visibility good. Nobody had asked him to keep the "
    "record, but he kept it all the same, because a lamp that nobody watches is only half a lamp."
)


# --- reading a Hugging Face source ---------------------------------------------------------------------


@dataclass
class HFSource:
    directory: Path  # holds config.json (and tokenizer files, when any)
    weights: list[Path]  # one file, or the shards an index names
    config: dict  # config.json
    family: str  # "gpt2" or "openai-gpt"


def resolve_source(source: str) -> HFSource:
    """A HF dir, a single weights file with config.json beside it, or a hub id (downloaded when online)."""
    path = Path(source).expanduser()
    if path.is_dir():
        directory, weights = path, find_weights(path)
    elif path.is_file():
        directory, weights = path.parent, weight_shards(path)
    elif looks_like_hub_id(source):
        directory = download_from_hub(source)
        weights = find_weights(directory)
    else:
        raise GptError(f"{source} does not exist (give a Hugging Face model dir, a weights file, or a hub id).")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise GptError(f"{directory} has no config.json; it is needed to know the model's shape.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        raise GptError(f"{config_path} is not valid JSON.") from None
    return HFSource(directory=directory, weights=weights, config=config, family=family_of(config, config_path))


def find_weights(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:  # safetensors first: no pickle, and it can be read one tensor at a time
        if (directory / name).is_file():
            return weight_shards(directory / name)
    present = ", ".join(sorted(p.name for p in directory.iterdir())[:12]) or "nothing"
    raise GptError(f"{directory} holds no Hugging Face weights ({', '.join(WEIGHT_FILES)}); it has: {present}.")


def weight_shards(path: Path) -> list[Path]:
    """A weights file, or the files a `*.index.json` lists in its weight_map."""
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError):
        raise GptError(f"{path} is not a Hugging Face weights index (no weight_map).") from None
    shards = [path.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(p.name) for p in shards if not p.is_file()]
    if missing:
        raise GptError(f"{path} names weight files that are not there: {', '.join(missing)}.")
    return shards


def looks_like_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) is not None and ".." not in text


def download_from_hub(repo_id: str) -> Path:
    """snapshot_download the files a conversion needs, safetensors when the repo has them."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise GptError(f"{repo_id} is not a local path, and downloading from the hub needs huggingface_hub "
                       "(pip install huggingface_hub).") from None
    try:  # one request for the file list (list_repo_files would retry for half a minute when offline)
        files = {sibling.rfilename for sibling in HfApi().model_info(repo_id).siblings or []}
    except Exception as error:  # offline, unknown repo, gated repo...: all end the same way for the user
        cached = _from_hub_cache(repo_id)
        if cached is not None:
            return cached
        reason = ("it does not exist or is private" if "NotFound" in type(error).__name__
                  else f"cannot reach the Hugging Face Hub ({type(error).__name__})")
        raise GptError(f"Could not download {repo_id}: {reason}, and it is not in the local cache; download "
                       f"it where there is network and pass the local dir instead: "
                       f"gpt load-hf ./{repo_id.split('/')[-1]} --out DIR.") from None
    weights = next((name for name in WEIGHT_FILES if name in files), None)
    if weights is None:
        raise GptError(f"Hub repo {repo_id} has no {' or '.join(WEIGHT_FILES)}.")
    shards = "model-*.safetensors" if "safetensors" in weights else "pytorch_model-*.bin"
    patterns = ["config.json", "vocab.json", "merges.txt", "tokenizer_config.json", weights, shards]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:
        raise GptError(f"Downloading {repo_id} from the Hugging Face Hub failed: {type(error).__name__}: {error}.") from None


def _from_hub_cache(repo_id: str) -> Optional[Path]:
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None
    return directory if any((directory / name).is_file() for name in WEIGHT_FILES) else None


def family_of(config: dict, config_path: Path) -> str:
    model_type = config.get("model_type")
    if model_type in ("gpt2", "openai-gpt"):
        return model_type
    if model_type is None:
        raise GptError(f"{config_path} has no model_type, so it is not a Hugging Face config (a gptcli model "
                       "dir needs no conversion: pass it to --checkpoint).")
    raise GptError(f'{config_path} describes model_type "{model_type}"; gptcli loads "gpt2" '
                   '(GPT2LMHeadModel layouts) and "openai-gpt" (GPT-1).')


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class HFWeights:
    """The tensors of one or more weights files by name: shapes up front, data only when asked for.

    safetensors are read one tensor at a time with plain reads into fresh memory, not through a memory
    map, so converting holds the converted model plus one source tensor: one copy of the weights, not
    two (a map's touched pages would stay resident until the file closes)."""

    BLOCK_BYTES = 16 << 20  # rows read per step when transposing; one buffer reused for every tensor

    def __init__(self, paths: list[Path]):
        self._block: Optional[torch.Tensor] = None
        self.shapes: dict[str, tuple] = {}
        self._sources: dict[str, object] = {}  # name -> (path, dtype, offset, bytes), or a loaded tensor
        for path in paths:
            if path.suffix == ".safetensors":
                self._add_safetensors(path)
            else:
                self._add_pickle(path)

    def _add_safetensors(self, path: Path) -> None:
        """Layout (safetensors' spec): u64 little-endian header length, JSON header, then the data."""
        try:
            with open(path, "rb") as file:
                header_length = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(header_length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                self.shapes[name] = tuple(entry["shape"])
                self._sources[name] = (path, SAFETENSORS_DTYPES[entry["dtype"]], 8 + header_length + begin, end - begin)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise GptError(f"Cannot read {path} as safetensors: {type(error).__name__}: {error}.") from None

    def _add_pickle(self, path: Path) -> None:
        try:  # weights_only: a .bin is a pickle, and only tensors may come out of it
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise GptError(f"Cannot read {path} as a PyTorch weights file: {error}.") from None
        for name, tensor in state.items():
            self.shapes[name] = tuple(tensor.shape)
            self._sources[name] = tensor

    def load(self, name: str, transpose: bool = False) -> torch.Tensor:
        """The tensor `name`; a 2-D one transposed into a fresh contiguous tensor when asked."""
        source = self._sources.pop(name)
        if isinstance(source, torch.Tensor):
            return source.t().contiguous() if transpose else source
        path, dtype, offset, size = source
        shape = self.shapes[name]
        with open(path, "rb") as file:
            file.seek(offset)
            if not transpose:
                tensor = torch.empty(shape, dtype=dtype)
                self._read_into(file, tensor, path, name)
                return tensor
            return self._read_transposed(file, shape, dtype, path, name)

    def _read_transposed(self, file, shape: tuple, dtype: torch.dtype, path: Path, name: str) -> torch.Tensor:
        """Read (rows, cols) a block of rows at a time into its (cols, rows) transpose. Reading the whole
        source first and freeing it after would leave freed blocks that glibc keeps, ~0.4x the model."""
        rows, cols = shape
        result = torch.empty((cols, rows), dtype=dtype)
        block_rows = max(1, self.BLOCK_BYTES // max(1, cols * result.element_size()))
        if self._block is None or self._block.numel() < block_rows * cols * result.element_size():
            self._block = torch.empty(block_rows * cols * result.element_size(), dtype=torch.uint8)
        block = self._block[: block_rows * cols * result.element_size()].view(dtype).view(block_rows, cols)
        for start in range(0, rows, block_rows):
            part = block[: min(block_rows, rows - start)]  # (r, cols)
            self._read_into(file, part, path, name)
            result[:, start:start + part.shape[0]] = part.t()  # (cols, r)
        return result

    @staticmethod
    def _read_into(file, tensor: torch.Tensor, path: Path, name: str) -> None:
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        if file.readinto(view) != len(view):
            raise GptError(f"{path} ends inside tensor {name}: the file is truncated.")


# --- config.json → [model] ------------------------------------------------------------------------------


def model_config_from_hf(hf: dict, family: str) -> ModelConfig:
    """The gptcli ModelConfig of a HF config.json; options gptcli's model cannot express are refused."""
    n_embd = hf.get("n_embd", 768)
    if family == "openai-gpt":
        activation, activations, mlp_ratio = hf.get("afn", "gelu"), GPT1_ACTIVATIONS, 4  # fixed 4*nx in HF
        layout = {"norm_position": "post", "final_norm": False, "vocab_size": hf.get("vocab_size", 40478),
                  "block_size": hf.get("n_positions", 512)}
    else:
        activation, activations = hf.get("activation_function", "gelu_new"), GPT2_ACTIVATIONS
        n_inner = hf.get("n_inner") or 4 * n_embd
        if n_inner % n_embd:
            raise GptError(f"config.json n_inner = {n_inner} is not a multiple of n_embd = {n_embd}; gptcli's "
                           "MLP width is a whole multiple (model.mlp_ratio).")
        mlp_ratio = n_inner // n_embd
        layout = {"norm_position": "pre", "final_norm": True, "vocab_size": hf.get("vocab_size", 50257),
                  "block_size": hf.get("n_positions", 1024)}
        refuse_gpt2_options(hf)
    if activation not in activations:
        raise GptError(f'config.json activation "{activation}" has no gptcli equivalent '
                       f"(supported: {', '.join(activations)}).")
    values = {**layout, "n_layer": hf.get("n_layer", 12), "n_head": hf.get("n_head", 12), "n_embd": n_embd,
              "mlp_ratio": mlp_ratio, "activation": activations[activation], "bias": True, "position": "learned",
              "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
              "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
              "dropout": float(hf.get("resid_pdrop", 0.1))}
    try:
        config = project_from_dict({"model": values}).model
    except ConfigError as error:
        raise GptError(f"config.json does not describe a model gptcli can build: {error}") from None
    return dataclasses.replace(config, preset=matching_preset(config))


def refuse_gpt2_options(hf: dict) -> None:
    unsupported = {"scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
                   "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
                   "add_cross_attention": (False, hf.get("add_cross_attention", False))}
    for key, (supported, value) in unsupported.items():
        if value != supported:
            raise GptError(f"config.json sets {key} = {json.dumps(value)}, which gptcli's GPT-2 does not "
                           f"implement (it needs {json.dumps(supported)}).")


def matching_preset(config: ModelConfig) -> Optional[str]:
    """The preset with exactly this architecture, so the count can be checked against its reference."""
    from .presets import PRESETS

    for name in PRESETS:
        preset_config = project_from_dict({"model": {"preset": name}}).model
        if preset_config.architecture_dict() == config.architecture_dict():
            return name
    return None


# --- tensors → model ------------------------------------------------------------------------------------------


def gptcli_name(hf_name: str, family: str, prefix: str) -> Optional[str]:
    """The gptcli name of a HF tensor, or None for a mask buffer (not a weight)."""
    name = hf_name[len(prefix):] if prefix and hf_name.startswith(prefix) else hf_name
    if MASK_BUFFER.fullmatch(name):
        return None
    if family == "openai-gpt":
        name = GPT1_RENAMES.get(name, name)
    return name


def is_transposed(name: str) -> bool:
    return any(name.endswith("." + suffix) for suffix in TRANSPOSED)


def hf_shape(name: str, shape: tuple) -> tuple:
    return tuple(reversed(shape)) if is_transposed(name) else tuple(shape)


def plan_conversion(weights: HFWeights, model_shapes: dict[str, tuple], family: str, where: str) -> dict[str, str]:
    """gptcli name → HF name for every weight, after checking names and shapes; one error lists all faults."""
    prefix = BODY_PREFIX if any(n.startswith(BODY_PREFIX) for n in weights.shapes) else ""
    plan, unexpected, wrong = {}, [], []
    for hf_name, shape in weights.shapes.items():
        name = gptcli_name(hf_name, family, prefix)
        if name is None:
            continue
        if name not in model_shapes:
            if family == "openai-gpt" and name == "position_ids":  # an old non-persistent buffer
                continue
            unexpected.append(hf_name)
        elif hf_shape(name, model_shapes[name]) != shape:
            wrong.append(f"{hf_name} {list(shape)} (expected {list(hf_shape(name, model_shapes[name]))})")
        else:
            plan[name] = hf_name
    missing = [hf_name_of(n, family, prefix) for n in model_shapes if n not in plan and n != "lm_head.weight"]
    if missing or unexpected or wrong:
        parts = [f"{label}: {listing(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise GptError(f"{where} does not fit its config.json ({family}): {'; '.join(parts)}.")
    return plan


def listing(items: list[str], most: int = 12) -> str:
    shown = ", ".join(items[:most])
    return shown if len(items) <= most else f"{shown} and {len(items) - most} more"


def hf_name_of(name: str, family: str, prefix: str = BODY_PREFIX) -> str:
    """The HF name of a gptcli weight (the inverse of gptcli_name)."""
    if name == "lm_head.weight":
        return name
    if family == "openai-gpt":
        name = {v: k for k, v in GPT1_RENAMES.items()}.get(name, name)
    return prefix + name


def convert_weights(source: HFSource, config: ModelConfig):
    """Build the gptcli model on the meta device and assign every tensor from the HF files into it."""
    from .model import build_model

    model = build_model(config, device="meta")
    model_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weights = HFWeights(source.weights)
    where = str(source.weights[0]) if len(source.weights) == 1 else f"the weights in {source.directory}"
    plan = plan_conversion(weights, model_shapes, source.family, where)
    state = {}
    for name, hf_name in plan.items():
        state[name] = weights.load(hf_name, transpose=is_transposed(name))  # Conv1D (in, out) → (out, in)
    check_head(state, config, where)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter; share it again
    return model.eval()


def check_head(state: dict, config: ModelConfig, where: str) -> None:
    head = state.pop("lm_head.weight", None)
    if not config.tie_embeddings:
        if head is None:
            raise GptError(f"{where} has no lm_head.weight, and config.json unties it from the embedding "
                           "(tie_word_embeddings = false).")
        state["lm_head.weight"] = head
    elif head is not None and not torch.equal(head, state["wte.weight"]):
        raise GptError(f"{where} has an lm_head.weight that differs from the token embedding, but config.json "
                       "ties them (tie_word_embeddings = true).")


# --- tokenizer ------------------------------------------------------------------------------------------------


def source_tokenizer(source: HFSource, vocab_size: int):
    """The tokenizer for the model dir and a line saying where it came from."""
    from .tokenizer import load_tokenizer

    directory = source.directory
    if source.family == "openai-gpt":
        if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
            raise GptError(f"{directory} has no vocab.json + merges.txt: an openai-gpt model needs its own "
                           "tokenizer files (Hugging Face's openai-gpt repository has them).")
        tokenizer = load_tokenizer("openai-gpt", str(directory))
        note = f"openai-gpt tokenizer from {directory}"
    else:
        has_files = any((directory / a).is_file() and (directory / b).is_file()
                        for a, b in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")))
        tokenizer, note = None, f"{directory} has no vocab.json + merges.txt; using gptcli's default gpt2 tokenizer"
        if has_files:
            try:
                tokenizer = load_tokenizer("gpt2", str(directory))
                note = f"GPT-2 tokenizer from {directory}"
            except GptError as error:
                note = f"the tokenizer files in {directory} are not GPT-2's ({error}); using gptcli's default gpt2 tokenizer"
        if tokenizer is None:
            tokenizer = load_tokenizer("gpt2")
    if tokenizer.vocab_size > vocab_size:
        note += (f"; warning: the tokenizer has {tokenizer.vocab_size:,} tokens but the model only "
                 f"{vocab_size:,}, so text with the higher ids cannot be fed to it")
    return tokenizer, note


# --- --verify ---------------------------------------------------------------------------------------------------


def verify_batch(tokenizer, config: ModelConfig) -> torch.Tensor:
    """(2, T) ids of VERIFY_TEXT: two windows of real text, T ≤ 64 and within the context."""
    ids = tokenizer.encode(VERIFY_TEXT)
    length = min(64, config.block_size, len(ids) // 2)
    batch = torch.tensor([ids[:length], ids[length:2 * length]], dtype=torch.long)  # (2, T)
    return batch % config.vocab_size  # a custom model with a smaller vocabulary still sees text-like ids


def reference_model(source: HFSource):
    """transformers' own model for the same files, in fp32 (the parity reference)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise GptError("--verify compares against transformers, which is not installed "
                       "(pip install transformers).") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # stderr is for gptcli's one-line messages
    transformers_logging.disable_progress_bar()
    standard = len(source.weights) == 1 and source.weights[0].name in WEIGHT_FILES
    if standard:
        return AutoModelForCausalLM.from_pretrained(str(source.directory)).float().eval()
    # A weights file under another name: transformers builds the model, the file is read as-is.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source.directory)))
    weights = HFWeights(source.weights)
    state = {name: weights.load(name).float() for name in list(weights.shapes)}  # HF names, HF layout
    if not any(name.startswith(BODY_PREFIX) for name in state):  # saved from GPT2Model: no `transformer.`
        state = {(name if name == "lm_head.weight" else BODY_PREFIX + name): t for name, t in state.items()}
    model.load_state_dict(state, strict=False)  # strict=False: old files also hold the mask buffers
    return model.float().eval()


def max_logit_difference(model, source: HFSource, tokenizer) -> float:
    """Max |logits(gptcli) - logits(transformers)| over a batch of real text, both in fp32."""
    batch = verify_batch(tokenizer, model.config)
    reference = reference_model(source)
    with torch.no_grad():
        expected = reference(batch).logits.float()  # (2, T, V)
        del reference
        logits, _ = model.float()(batch)  # (2, T, V)
    return (logits - expected).abs().max().item()


# --- gpt load-hf ------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    out: Path
    family: str
    source: str
    weights: list[str]
    dtype: str
    parameters: int
    reference: Optional[int]
    preset: Optional[str]
    tokenizer: str
    tokenizer_note: str
    max_abs_diff: Optional[float] = None

    @property
    def matches(self) -> Optional[bool]:
        return None if self.reference is None else self.parameters == self.reference

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        return {**values, "out": str(self.out), "matches": self.matches, "tolerance": VERIFY_TOLERANCE}


def load_hf(source: str, out: Path | str, verify: bool = False, force: bool = False) -> LoadReport:
    """Convert a Hugging Face GPT-2 / GPT-1 into a gptcli model dir at `out` (written atomically)."""
    from .inspect import reference_for
    from .model import count_parameters
    from .modeldir import load_model_dir, replace_dir, save_model_dir

    out = Path(out)
    refuse_existing(out, force)
    hf = resolve_source(source)
    config = model_config_from_hf(hf.config, hf.family)
    tokenizer, tokenizer_note = source_tokenizer(hf, config.vocab_size)
    model = convert_weights(hf, config)
    dtype = str(model.wte.weight.dtype).replace("torch.", "")
    reference, _ = reference_for(config)
    report = LoadReport(out=out, family=hf.family, source=source, weights=[str(p) for p in hf.weights], dtype=dtype,
                        parameters=count_parameters(model), reference=reference, preset=config.preset,
                        tokenizer=tokenizer.fingerprint, tokenizer_note=tokenizer_note)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".load-hf", dir=out.parent))
    try:
        staged = save_model_dir(staging / "model", model, tokenizer, metadata={"source": source})
        del model  # verify reads back what was written, so the file itself is what is proven
        if verify:
            report.max_abs_diff = max_logit_difference(load_model_dir(staged, dtype=torch.float32).model, hf, tokenizer)
            if not report.max_abs_diff <= VERIFY_TOLERANCE:
                raise GptError(f"--verify failed: the converted model's logits differ from transformers' by up to "
                               f"{report.max_abs_diff:.3g} (tolerance {VERIFY_TOLERANCE:g}); nothing was written to {out}.")
        replace_dir(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def refuse_existing(out: Path, force: bool) -> None:
    if out.is_file():
        raise GptError(f"{out} is a file; --out must be a directory.")
    if out.exists() and not force and any(out.iterdir()):
        raise GptError(f"{out} already exists (use --force to replace it).")


# --- gpt export-hf ----------------------------------------------------------------------------------------------


def export_family(config: ModelConfig) -> str:
    """gpt2 or openai-gpt, or a refusal naming the option that Hugging Face's classes cannot express."""
    fixed = {"position": "learned", "attention": "causal", "bias": True}
    for key, needed in fixed.items():
        if getattr(config, key) != needed:
            raise GptError(f"model.{key} = {json.dumps(getattr(config, key))} has no Hugging Face GPT-2/GPT-1 "
                           f"equivalent (export needs {json.dumps(needed)}).")
    if config.norm_position == "pre" and config.final_norm:
        family = "gpt2"
    elif config.norm_position == "post" and not config.final_norm:
        family = "openai-gpt"
    else:
        raise GptError(f'model.norm_position = "{config.norm_position}" with model.final_norm = '
                       f"{str(config.final_norm).lower()} matches neither GPT-2 (pre, true) nor GPT-1 (post, false).")
    if family == "openai-gpt":
        if config.mlp_ratio != 4:
            raise GptError(f"model.mlp_ratio = {config.mlp_ratio}: Hugging Face's GPT-1 has a fixed MLP width of 4.")
        if config.activation == "gelu":
            raise GptError('model.activation = "gelu" (exact): Hugging Face\'s GPT-1 only has the tanh GELU.')
    return family


def hf_config_for(config: ModelConfig, family: str, tokenizer, dtype: torch.dtype) -> dict:
    common = {"vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
              "n_layer": config.n_layer, "n_head": config.n_head, "layer_norm_epsilon": config.layer_norm_epsilon,
              "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
              "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings,
              "dtype": str(dtype).replace("torch.", "")}
    if family == "openai-gpt":
        afn = {v: k for k, v in GPT1_ACTIVATIONS.items() if k != "swish"}[config.activation]
        return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", **common, "afn": afn}
    eot = tokenizer.eot_id if tokenizer.eot_id is not None and tokenizer.eot_id < config.vocab_size else None
    activation = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[config.activation]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_inner": config.mlp_ratio * config.n_embd, "activation_function": activation,
            "scale_attn_weights": True, "bos_token_id": eot, "eos_token_id": eot}


def export_tensors(model_dir: Path, config: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """The model dir's weights under HF names: Conv1D transposes, GPT-1 renames, no vocabulary padding."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as file:
        for name in file.keys():
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # stored once, as wte.weight; transformers re-ties it on load
            tensor = file.get_tensor(name)
            if name in ("wte.weight", "lm_head.weight"):
                tensor = tensor[: config.vocab_size]  # (V, C): padding rows (vocab_multiple) are not exported
            if is_transposed(name):
                tensor = tensor.t()  # (out, in) → Conv1D's (in, out)
            tensors[hf_name_of(name, family)] = tensor.contiguous()
    return tensors


def gpt2_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover GPT-2's merge list from tiktoken ranks: BPE on each token's bytes with only the merges
    ranked below it ends in exactly two parts, and those two parts are the merge that made the token."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best_rank, index = min(candidates)
            if best_rank >= rank:
                raise GptError(f"Token rank {rank} cannot be built from lower-ranked merges: not a BPE vocabulary.")
            parts[index:index + 2] = [parts[index] + parts[index + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer_files(directory: Path, tokenizer, config: ModelConfig) -> list[str]:
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json, as AutoTokenizer reads them."""
    from .tokenizer import ENDOFTEXT, bytes_to_unicode

    if tokenizer.name == "openai-gpt":
        files = tokenizer.backend.save(directory)
        special = {"unk_token": "<unk>"}
        tokenizer_config = {"tokenizer_class": "OpenAIGPTTokenizer", **special}
    else:
        to_text = bytes_to_unicode()
        text = lambda token: "".join(to_text[b] for b in token)  # noqa: E731
        ranks = tokenizer.backend._mergeable_ranks
        vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
        vocab[ENDOFTEXT] = tokenizer.eot_id
        (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = "".join(f"{text(a)} {text(b)}\n" for a, b in gpt2_merges(ranks))
        (directory / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
        files = ["vocab.json", "merges.txt"]
        special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **special}
    tokenizer_config["model_max_length"] = config.block_size
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return files + ["tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class ExportReport:
    out: Path
    family: str
    source: str
    tensors: int
    files: list[str]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "out": str(self.out)}


def export_hf(checkpoint: Path | str, out: Path | str, force: bool = False) -> ExportReport:
    """Write a model dir (or a run dir's consolidated model) as a Hugging Face dir that
    AutoModelForCausalLM.from_pretrained and AutoTokenizer load."""
    from safetensors.torch import save_file

    from .modeldir import read_model_config, resolve_model_dir
    from .tokenizer import load_from_model_dir

    out = Path(out)
    refuse_existing(out, force)
    model_dir = resolve_model_dir(checkpoint)
    config = read_model_config(model_dir)
    family = export_family(config)
    tokenizer = load_from_model_dir(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-hf", dir=out.parent))
    try:
        tensors = export_tensors(model_dir, config, family)
        dtype = tensors[hf_name_of("wte.weight", family)].dtype
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        hf_config = hf_config_for(config, family, tokenizer, dtype)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        files = ["config.json", "model.safetensors", *write_tokenizer_files(staging, tokenizer, config)]
        replace_hf_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(out=out, family=family, source=str(model_dir), tensors=len(tensors), files=files)


def replace_hf_dir(staging: Path, target: Path) -> None:
    """Rename the finished dir into place; an existing target may only be a HF dir or empty."""
    if target.exists() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise GptError(f"{target} exists and is not a Hugging Face model dir; refusing to replace it.")
    publish_dir(staging, target)