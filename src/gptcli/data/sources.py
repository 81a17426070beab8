"""Where `gpt prepare` reads text from: files, directories, globs, .jsonl, .gz, saved `datasets`
dirs and `hf:NAME[/CONFIG]`, turned into a stream of bounded tokenization tasks.

The reader runs in the main process and only cuts text; the worker pool (prepare.py) turns each task into
documents and tokens. A task is a tuple whose first item names how its text becomes documents:

    ("piece", text, closes)          part of one document (one per file); `closes`: the document ends here
    ("lines", text)                  every non-blank line is a document
    ("paragraphs", text)             every run of non-blank lines is a document
    ("jsonl", text, path, line, field)  one JSON record per line, text in `field`; `line` numbers the first
    ("records", texts)               one document per string (dataset rows)

Memory stays flat: a task holds about `chunk_chars` characters, whatever the size of the input.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from ..errors import GptError

# What a directory walk picks up. Explicitly named files are read whatever their suffix.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".raw", ".tokens", ".jsonl")
DATASET_MARKERS = ("dataset_info.json", "state.json")  # written by Dataset.save_to_disk
DATASET_DICT_MARKER = "dataset_dict.json"  # written by DatasetDict.save_to_disk

# Where one document may be cut into two tokenization calls without changing a single token. GPT-2's
# pre-tokenizer ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) never joins a non-space
# character to a following space, and a piece that starts at " X" (X not a space) is matched by one of the
# " ?..." alternatives the same way whether or not text precedes it; likewise "a\n" then "b" splits into
# "a", "\n", "b" either way. Neighbours are limited to printable ASCII so Python's and the Rust regex's ideas
# of whitespace cannot differ. tests/test_prepare.py checks cut documents against whole-text encoding.
SAFE_CUT = re.compile(r"(?<=[!-~])(?= [!-~])|(?<=[!-~]\n)(?=[!-~])")
BLANK_LINE_END = re.compile(r"\n[^\S\n]*\n")  # the end of a blank line: a paragraph boundary
CUT_WINDOW = 1 << 20  # how far back from a chunk's end to look for a cut point, in characters


@dataclass(frozen=True)
class Source:
    """One input: `kind` is "text", "jsonl", "dataset" or "hf"; `size` is its bytes on disk (0: unknown)."""

    kind: str
    location: str
    size: int = 0

    @property
    def label(self) -> str:
        return self.location if self.kind != "hf" else f"hf:{self.location}"


# --- resolving what the user named ------------------------------------------------------------------------


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Expand INPUT... into sources, in the order given (directories and globs sorted), refusing
    anything missing or empty before any work starts."""
    if not specs:
        raise GptError("No input given: name text files, directories, globs, .jsonl files, a saved dataset "
                       "dir or hf:NAME.")
    sources: list[Source] = []
    for spec in specs:
        sources.extend(_resolve_one(spec))
    return sources


def _resolve_one(spec: str) -> list[Source]:
    if spec.startswith("hf:"):
        return [Source("hf", spec[3:])]
    path = Path(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            return [Source("dataset", str(path))]
        files = _text_files_under(path)
        if not files:
            raise GptError(f"Directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)} or .gz of those).")
        return [_file_source(f) for f in files]
    if path.is_file():
        return [_file_source(path)]
    if glob.has_magic(spec):
        matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
        if not matches:
            raise GptError(f"The pattern {spec} matches no files.")
        return [_file_source(m) for m in matches]
    raise GptError(f"Input {spec} does not exist.")


def _is_saved_dataset(path: Path) -> bool:
    return all((path / m).is_file() for m in DATASET_MARKERS) or (path / DATASET_DICT_MARKER).is_file()


def _text_files_under(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            bare = name[:-3] if name.endswith(".gz") else name
            if not name.startswith(".") and bare.lower().endswith(TEXT_SUFFIXES):
                found.append(Path(root) / name)
    return found


def _file_source(path: Path) -> Source:
    bare = path.name[:-3] if path.name.endswith(".gz") else path.name
    kind = "jsonl" if bare.lower().endswith(".jsonl") else "text"
    return Source(kind, str(path), path.stat().st_size)


# --- decoding bytes ------------------------------------------------------------------------------------------


class Utf8Decoder:
    """Incremental UTF-8 decoding that either refuses invalid bytes (naming file and offset) or replaces
    each with U+FFFD and counts them."""

    def __init__(self, path: str, replace: bool):
        self.path, self.replace = path, replace
        self.replaced = 0
        self.offset = 0  # bytes fed so far, for messages
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")

    def decode(self, block: bytes, final: bool = False) -> str:
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError as error:
            if not self.replace:
                raise GptError(f"{self.path} is not valid UTF-8 (byte 0x{error.object[error.start]:02x} near offset "
                               f"{self.offset + error.start:,}); re-encode it, or pass --replace-invalid-utf8 to "
                               "read such bytes as U+FFFD.") from None
            text = self._decode_replacing(block, final)
        self.offset += len(block)
        return text

    def _decode_replacing(self, block: bytes, final: bool) -> str:
        pending, _ = self._decoder.getstate()  # bytes of a character split across blocks
        data = pending + block
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(data, final)
        # U+FFFD already present in the input is not a replacement: count only what decoding added.
        self.replaced += text.count("\ufffd") - data.count("\ufffd".encode())
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        leftover, _ = decoder.getstate()
        if leftover:
            self._decoder.decode(leftover, False)
        return text


def _open_binary(path: str):
    """(stream of decompressed bytes, raw file whose position tracks progress on disk)."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


# --- cutting text into tasks --------------------------------------------------------------------------------


@dataclass
class ReadState:
    """What the reader has consumed so far: for progress, the summary and the manifest."""

    disk_bytes: int = 0  # bytes of input files read from disk (compressed size for .gz)
    text_bytes: int = 0  # bytes of text read (after decompression)
    replaced: int = 0  # invalid UTF-8 bytes read as U+FFFD


def file_tasks(source: Source, separator: str, text_column: str, chunk_chars: int, replace_invalid: bool,
               state: ReadState) -> Iterator[tuple]:
    """Tasks for one text or .jsonl file, read in blocks of about `chunk_chars`."""
    decoder = Utf8Decoder(source.location, replace_invalid)
    stream, raw = _open_binary(source.location)
    line = 1
    try:
        cutter = _Cutter(separator if source.kind == "text" else "jsonl", chunk_chars)
        for text in _decoded_blocks(stream, raw, decoder, chunk_chars, state):
            for piece, closes in cutter.feed(text, final=False):
                yield _task(source, separator, text_column, piece, closes, line)
                line += piece.count("\n")
        for piece, closes in cutter.feed("", final=True):
            yield _task(source, separator, text_column, piece, closes, line)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise GptError(f"Cannot read {source.location}: {getattr(error, 'strerror', None) or error}.") from None
    finally:
        state.replaced += decoder.replaced
        stream.close()
        raw.close()


def _decoded_blocks(stream, raw, decoder: Utf8Decoder, chunk_chars: int, state: ReadState) -> Iterator[str]:
    before = 0
    while True:
        block = stream.read(chunk_chars)
        state.text_bytes += len(block)
        position = raw.tell()
        state.disk_bytes += position - before
        before = position
        if not block:
            break
        yield decoder.decode(block)
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def _task(source: Source, separator: str, text_column: str, piece: str, closes: bool, line: int) -> tuple:
    if source.kind == "jsonl":
        return ("jsonl", piece, source.location, line, text_column)
    if separator == "none":
        return ("piece", piece, closes)
    return ("lines" if separator == "line" else "paragraphs", piece)


class _Cutter:
    """Buffers decoded text and hands out pieces of about the chunk size, cut where the mode allows:
    at a line end (line, jsonl), after a blank line (paragraphs), or at a SAFE_CUT inside the one document
    of a file (none). Text without such a place keeps growing until one comes (a single line or paragraph
    longer than the chunk size is held whole)."""

    def __init__(self, mode: str, chunk_chars: int):
        self.mode, self.chunk_chars = mode, chunk_chars
        self.buffer = ""
        self.emitted = False

    def feed(self, text: str, final: bool) -> Iterator[tuple[str, bool]]:
        self.buffer += text
        if not final:
            cut = self._cut_point() if len(self.buffer) >= self.chunk_chars else None
            if cut:
                piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
                self.emitted = True
                yield piece, False
            return
        if self.buffer or (self.mode == "none" and self.emitted):
            yield self.buffer, True
        self.buffer = ""

    def _cut_point(self) -> Optional[int]:
        start = max(0, len(self.buffer) - CUT_WINDOW)
        if self.mode in ("line", "jsonl"):
            end = self.buffer.rfind("\n", start)
            return end + 1 if end >= 0 else None
        pattern = SAFE_CUT if self.mode == "none" else BLANK_LINE_END
        last = None
        for last in pattern.finditer(self.buffer, start):
            pass
        return last.end() if last is not None else None


# --- datasets ------------------------------------------------------------------------------------------------


def dataset_tasks(source: Source, text_column: str, chunk_chars: int, state: ReadState) -> Iterator[tuple]:
    """("records", texts) tasks from a saved dataset dir or an hf: dataset, in row order."""
    dataset = _open_dataset(source)
    columns = list(dataset.column_names or [])
    if columns and text_column not in columns:
        raise GptError(f"{source.label} has no column {text_column!r} (columns: {', '.join(columns)}); "
                       "pass --text-column.")
    texts, size = [], 0
    for batch in dataset.iter(batch_size=1024):
        if text_column not in batch:  # a streamed dataset may not know its columns before the first rows
            raise GptError(f"{source.label} has no column {text_column!r} (columns: {', '.join(batch)}); "
                           "pass --text-column.")
        for value in batch[text_column]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise GptError(f"{source.label} column {text_column!r} holds {type(value).__name__}, not text.")
            texts.append(value)
            size += len(value)
        if size >= chunk_chars:
            state.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
            yield ("records", texts)
            texts, size = [], 0
    if texts:
        state.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
        yield ("records", texts)


def _open_dataset(source: Source):
    import datasets

    if source.kind == "dataset":
        loaded = datasets.load_from_disk(source.location)
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, source)
        return loaded
    return _open_hub_dataset(source.location)


def _pick_split(splits, source: Source):
    """A saved DatasetDict: its train split (held-out splits stay out of a training corpus)."""
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise GptError(f"{source.label} holds the splits {', '.join(splits)} and none is named train; save the one "
                   "to prepare on its own.")


def _open_hub_dataset(spec: str):
    name, _, config = spec.partition("/")
    if "/" in config:  # owner/name/config
        owner_name, config = f"{name}/{config.rsplit('/', 1)[0]}", config.rsplit("/", 1)[1]
        name = owner_name
    _require_hub(spec)
    import datasets

    try:
        return datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as error:  # datasets raises many kinds: missing dataset, config, network
        raise GptError(f"Could not open hf:{spec} with datasets.load_dataset ({type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else 'no detail'}).") from None


def _require_hub(spec: str) -> None:
    """Fail in a second, not after minutes of retries, when the Hub cannot be reached."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    hint = (f"hf:{spec} needs the Hugging Face Hub, which {{why}}; on a machine with network access save it with "
            "datasets.load_dataset(...).save_to_disk(DIR) and pass DIR instead.")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise GptError(hint.format(why="is switched off by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE"))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        raise GptError(hint.format(why=f"cannot be reached from here ({host})")) from None


def source_tasks(source: Source, separator: str, text_column: str, chunk_chars: int, replace_invalid: bool,
                 state: ReadState) -> Iterator[tuple]:
    if source.kind in ("text", "jsonl"):
        return file_tasks(source, separator, text_column, chunk_chars, replace_invalid, state)
    return dataset_tasks(source, text_column, chunk_chars, state)


