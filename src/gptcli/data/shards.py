"""The shard file format, the manifest, verification, and memory-mapped reading.

A shard is a 128-byte header followed by the token ids:

    offset  size  field
    0       8     magic b"GPTSHARD"
    8       4     format version (uint32, little-endian), now 1
    12      4     bytes per token: 2 (uint16, any vocab up to 65,536) or 4 (uint32)
    16      8     token count (uint64)
    24      4     vocabulary size the ids were made with (uint32)
    28      64    tokenizer fingerprint, ASCII, NUL-padded
    92      36    zero

`manifest.json` lists every shard with its split, token count and sha256, and is written last: a
directory without it is never taken for a complete dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import GptError
from ..fsutil import atomic_write_json

MAGIC = b"GPTSHARD"
FORMAT_VERSION = 1
HEADER_BYTES = 128
MANIFEST = "manifest.json"
_HEADER = struct.Struct("<8sIIQI64s")  # magic, version, token bytes, count, vocab size, fingerprint


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class ShardHeader:
    version: int
    token_bytes: int
    num_tokens: int
    vocab_size: int
    fingerprint: str

    def pack(self) -> bytes:
        packed = _HEADER.pack(MAGIC, self.version, self.token_bytes, self.num_tokens, self.vocab_size,
                              self.fingerprint.encode("ascii"))
        return packed.ljust(HEADER_BYTES, b"\0")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.token_bytes == 2 else np.dtype(np.uint32)


def read_header(path: Path) -> ShardHeader:
    """Read and check a shard's header against the file's size."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(HEADER_BYTES)
    except OSError as error:
        raise GptError(f"Cannot read shard {path}: {error.strerror}.") from None
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise GptError(f"{path} is not a gptcli shard (bad magic number).")
    _, version, token_bytes, count, vocab, fingerprint = _HEADER.unpack(raw[: _HEADER.size])
    if version != FORMAT_VERSION:
        raise GptError(f"{path} has shard format version {version}; this gptcli reads version {FORMAT_VERSION}.")
    if token_bytes not in (2, 4):
        raise GptError(f"{path} has a corrupt header (token size {token_bytes}).")
    header = ShardHeader(version, token_bytes, count, vocab, fingerprint.rstrip(b"\0").decode("ascii", "replace"))
    size = os.path.getsize(path)
    expected = HEADER_BYTES + count * token_bytes
    if size != expected:
        raise GptError(f"{path} is truncated or corrupt: {size:,} bytes where its header promises {expected:,}.")
    return header


class ShardWriter:
    """Streams tokens into `path` under a temporary name, hashing as it goes; `close()` fills in the
    header, fsyncs and renames. An exception (or Ctrl-C) inside `with` removes the temporary file."""

    def __init__(self, path: Path, vocab_size: int, fingerprint: str):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.num_tokens = 0
        self.max_id = -1  # the largest id written, recorded in the manifest (checked against a model's vocab)
        self._hash = hashlib.sha256()
        self._file = open(self.tmp, "wb")
        self._file.write(b"\0" * HEADER_BYTES)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        if len(tokens):
            self.max_id = max(self.max_id, int(tokens.max()))
        data = tokens.tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.num_tokens += len(tokens)

    def close(self) -> "ShardRecord":
        header = ShardHeader(FORMAT_VERSION, self.dtype.itemsize, self.num_tokens, self.vocab_size, self.fingerprint)
        self._file.seek(0)
        self._file.write(header.pack())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return ShardRecord(file=self.path.name, split="", tokens=self.num_tokens, sha256=self._hash.hexdigest(),
                           max_id=self.max_id)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass
class ShardRecord:
    """One shard as the manifest lists it; sha256 covers the token bytes (not the header)."""

    file: str
    split: str
    tokens: int
    sha256: str
    max_id: int = -1  # the largest token id in it (-1: empty)


@dataclass
class Shard:
    path: Path
    split: str
    header: ShardHeader
    sha256: str
    max_id: Optional[int] = None  # from the manifest; None for data prepared before it was recorded
    _tokens: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.header.num_tokens

    @property
    def tokens(self) -> np.ndarray:
        """The token ids, memory-mapped (read-only, opened on first use)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.header.dtype, mode="r", offset=HEADER_BYTES,
                                     shape=(self.header.num_tokens,))
        return self._tokens

    def verify_checksum(self) -> None:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            handle.seek(HEADER_BYTES)
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            raise GptError(f"{self.path} does not match the checksum in {MANIFEST}: the shard is corrupt.")

    def verify_ids(self, vocab_size: int) -> None:
        tokens, top = self.tokens, -1
        for start in range(0, len(tokens), 1 << 24):
            top = max(top, int(tokens[start:start + (1 << 24)].max(initial=0)))
            if top >= vocab_size:
                raise GptError(f"{self.path} holds token id {top}, outside the vocabulary of {vocab_size}.")
        if self.max_id is not None and top != self.max_id and len(tokens):
            raise GptError(f"{self.path} holds ids up to {top} but {MANIFEST} records {self.max_id}: the shard is corrupt.")


@dataclass
class PreparedData:
    """A prepared directory: its manifest and its shards by split."""

    directory: Path
    manifest: dict
    splits: dict[str, list[Shard]]

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self.splits.get(split, []))

    def check_fits(self, fingerprint: Optional[str], model_vocab_size: int) -> None:
        """Refuse shards made with another tokenizer, or with ids the model cannot embed."""
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise GptError(f"The shards in {self.directory} were made with tokenizer {self.fingerprint}, but the "
                           f"model's tokenizer is {fingerprint}; prepare the data again with the same [data] tokenizer.")
        if self.vocab_size > model_vocab_size:
            raise GptError(f"The shards in {self.directory} use a vocabulary of {self.vocab_size:,} ids, more than "
                           f"model.vocab_size = {model_vocab_size:,}.")
        for shard in (s for shards in self.splits.values() for s in shards):
            if shard.max_id is not None and shard.max_id >= model_vocab_size:
                raise GptError(f"Shard {shard.path} holds token id {shard.max_id}, outside the model's vocabulary of "
                               f"{model_vocab_size:,} ids (model.vocab_size); prepare it again with the model's tokenizer.")


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_json(Path(directory) / MANIFEST, manifest)


def open_prepared(directory: Path | str, verify: bool = False) -> PreparedData:
    """Open a prepared dir: every listed shard must exist with a header that agrees with the manifest.
    `verify` also checks every shard's sha256 and that every id is inside the vocabulary."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise GptError(f"Data dir {directory} does not exist (run `gpt prepare` first).")
    if not manifest_path.is_file():
        raise GptError(f"{directory} has no {MANIFEST}: it was not prepared, or `gpt prepare` did not finish.")
    try:
        manifest = json.loads(manifest_path.read_text())
        records = manifest["shards"]
        fingerprint = manifest["tokenizer"]["fingerprint"]
        vocab_size = int(manifest["tokenizer"]["vocab_size"])
    except (ValueError, KeyError, TypeError):
        raise GptError(f"{manifest_path} is not a valid gptcli manifest.") from None
    splits: dict[str, list[Shard]] = {}
    for record in records:
        path = directory / record["file"]
        if not path.is_file():
            raise GptError(f"{MANIFEST} lists {record['file']}, which is missing from {directory}.")
        header = read_header(path)
        if header.num_tokens != record["tokens"] or header.fingerprint != fingerprint or header.vocab_size != vocab_size:
            raise GptError(f"{path} does not agree with {MANIFEST} (token count, tokenizer or vocabulary).")
        max_id = record.get("max_id")
        if max_id is not None and not isinstance(max_id, int):
            raise GptError(f"{manifest_path} is not a valid gptcli manifest (max_id of {record['file']}).")
        shard = Shard(path=path, split=record["split"], header=header, sha256=record["sha256"], max_id=max_id)
        if verify:
            shard.verify_checksum()
            shard.verify_ids(vocab_size)
        splits.setdefault(record["split"], []).append(shard)
    return PreparedData(directory=directory, manifest=manifest, splits=splits)
