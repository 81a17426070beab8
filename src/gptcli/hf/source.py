"""Finding and reading a Hugging Face checkpoint: a model dir, a weights file with config.json beside it,
or a hub id; safetensors read one tensor at a time, pytorch_model.bin through torch.load(weights_only)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import GptError
from ..parsing import loads_json

FileSpan = tuple[Path, torch.dtype, int, int]  # a tensor in a file: (path, dtype, offset, bytes)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SAFETENSORS_HEADER_LIMIT = 100 << 20  # bytes; the safetensors format caps its JSON header at 100 MB


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
        config = loads_json(config_path.read_text())
    except ValueError:
        raise GptError(f"{config_path} is not valid JSON.") from None
    if not isinstance(config, dict):
        raise GptError(f"{config_path} is not a JSON object, so it is not a Hugging Face config.")
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
        weight_map = loads_json(path.read_text())["weight_map"]
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
        self.dtypes: dict[str, torch.dtype] = {}
        self._sources: dict[str, Union[FileSpan, torch.Tensor]] = {}  # a tensor's bytes in a file, or the tensor
        for path in paths:
            if path.suffix == ".safetensors":
                self._add_safetensors(path)
            else:
                self._add_pickle(path)

    def _add_safetensors(self, path: Path) -> None:
        """Layout (safetensors' spec): u64 little-endian header length, JSON header, then the data. Every
        entry is checked against the file's size up front, so a truncated file is named before any work."""
        try:
            size = path.stat().st_size
            with open(path, "rb") as file:
                header_length = int.from_bytes(file.read(8), "little")
                if size < 8 or header_length > min(size - 8, SAFETENSORS_HEADER_LIMIT):
                    raise GptError(f"{path} is not a safetensors file (its first 8 bytes give no header that fits "
                                   "the file); it may be damaged or another format.")
                header = json.loads(file.read(header_length))
        except OSError as error:
            raise GptError(f"Cannot read {path}: {error.strerror or error}.") from None
        except ValueError:  # JSON or UTF-8
            raise GptError(f"{path} is not a safetensors file (its header is not JSON); it may be damaged or "
                           "another format.") from None
        if not isinstance(header, dict):
            raise GptError(f"{path} is not a safetensors file (its header is not a JSON object).")
        for name, entry in header.items():
            if name != "__metadata__":
                self._add_safetensors_entry(path, name, entry, 8 + header_length, size)

    def _add_safetensors_entry(self, path: Path, name: str, entry, data_start: int, size: int) -> None:
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise GptError(f"{path} has a malformed safetensors entry for {name}; the file is damaged.") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise GptError(f"{path} stores {name} as {dtype_name}, which gptcli does not read "
                           f"(it reads {', '.join(SAFETENSORS_DTYPES)}).")
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise GptError(f"{path} gives {name} {end - begin} bytes for shape {list(shape)} in {dtype_name}; "
                           "the file is damaged.")
        if data_start + end > size:
            raise GptError(f"{path} is truncated: {name} ends at byte {data_start + end:,} but the file has "
                           f"{size:,} bytes.")
        self.shapes[name], self.dtypes[name] = shape, dtype
        self._sources[name] = (path, dtype, data_start + begin, end - begin)

    def _add_pickle(self, path: Path) -> None:
        try:  # weights_only: a .bin is a pickle, and only tensors may come out of it
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GptError(f"Cannot read {path} as a PyTorch weights file: {reason}.") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise GptError(f"{path} holds no name → tensor map, so it is not a PyTorch weights file.")
        for name, tensor in state.items():
            self.shapes[name], self.dtypes[name] = tuple(tensor.shape), tensor.dtype
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
        # numpy's stubs declare ndarray's buffer protocol (__buffer__) only from Python 3.12; it has it on 3.10.
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        if file.readinto(view) != len(view):
            raise GptError(f"{path} ends inside tensor {name}: the file is truncated.")


