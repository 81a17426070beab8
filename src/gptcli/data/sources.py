"""Where `gpt prepare` reads text from: files, directories, globs, .jsonl, .gz, Parquet files (a Hub dataset
downloaded as it is stored), saved `datasets` dirs and `hf:NAME[/CONFIG]`, turned into a stream of bounded
tokenization tasks; and the one way datasets are opened (`open_dataset`), which `gpt eval --dataset` uses too.

The reader runs in the main process and only cuts text; the worker pool (prepare.py) turns each task into
documents and tokens. A task's type says how its text becomes documents (`Task.documents()`):

    FilePiece         part of the one document a text file is (--separator none)
    TextLines         every non-blank line is a document (--separator line)
    TextParagraphs    every run of non-blank lines is a document (--separator blank-line)
    JsonlRecords      one JSON record per line, the text in a named field
    FileRange         bytes of a plain file whose documents end at line ends (.jsonl, --separator line),
                      read and decoded by the worker itself: the reading process only finds where to cut
    DatasetRows       one document per string (rows of a dataset or of a Parquet file)

Memory stays flat: a task holds about `chunk_chars` characters, whatever the size of the input.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union
from urllib.parse import urlparse

from ..config import Separator
from ..errors import GptError

# What a directory walk picks up. Explicitly named files are read whatever their suffix.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".raw", ".tokens", ".jsonl")
PARQUET_SUFFIX = ".parquet"  # a Hub dataset's files as `huggingface-cli download` leaves them: rows, a text column
PARQUET_ROWS = 1024  # rows read from a Parquet file at a time: memory stays flat whatever the file's size
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


SourceKind = Literal["text", "jsonl", "parquet", "dataset", "hf"]


@dataclass(frozen=True)
class Source:
    """One input; `size` is its bytes on disk (0: unknown, as for datasets)."""

    kind: SourceKind
    location: str
    size: int = 0

    @property
    def label(self) -> str:
        return self.location if self.kind != "hf" else f"hf:{self.location}"

    @property
    def path(self) -> Optional[Path]:
        """The file or dir read, for checks that an output never replaces an input."""
        return Path(self.location) if self.kind != "hf" else None


# --- tasks: what a worker process turns into documents ----------------------------------------------------


@dataclass(frozen=True)
class FilePiece:
    """Part of the one document a text file is; `closes`: the document ends with this piece."""

    source: int  # index of the input it came from
    text: str
    closes: bool

    def documents(self) -> tuple[list[str], bool]:
        """(documents in order, whether the last one ends in this task)."""
        return [self.text], self.closes


@dataclass(frozen=True)
class TextLines:
    source: int
    text: str

    def documents(self) -> tuple[list[str], bool]:
        return [line.rstrip("\r") for line in self.text.split("\n") if line.strip()], True


@dataclass(frozen=True)
class TextParagraphs:
    source: int
    text: str

    def documents(self) -> tuple[list[str], bool]:
        return paragraphs(self.text), True


@dataclass(frozen=True)
class JsonlRecords:
    source: int
    text: str
    path: str
    first_line: int  # line number of the first line of `text`, for messages
    column: str
    replace_invalid_utf8: bool = False

    def documents(self) -> tuple[list[str], bool]:
        try:
            return jsonl_records(self.text, self.column, self.replace_invalid_utf8), True
        except BadRecord as bad:
            raise GptError(f"{self.path} line {self.first_line + bad.line}{bad.problem}") from None


@dataclass(frozen=True)
class FileRange:
    """Bytes [start, end) of a plain file, cut at line ends, whose documents are its lines ("line") or the
    records of its lines ("jsonl"). The worker reads and decodes them: no text passes between processes."""

    source: int
    path: str
    start: int
    end: int
    mode: Literal["line", "jsonl"]
    column: str = "text"
    replace_invalid_utf8: bool = False

    def documents(self) -> tuple[list[str], bool]:
        return self.read()[0], True

    def read(self) -> tuple[list[str], int]:
        """(documents, invalid UTF-8 bytes read as U+FFFD)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.start)
                data = handle.read(self.end - self.start)
        except OSError as error:
            raise GptError(f"Cannot read {self.path}: {error.strerror or error}.") from None
        text, replaced = self._decode(data)
        if self.mode == "line":
            return [line.rstrip("\r") for line in text.split("\n") if line.strip()], replaced
        try:
            return jsonl_records(text, self.column, self.replace_invalid_utf8), replaced
        except BadRecord as bad:
            raise GptError(f"{self.path} line {self._first_line() + bad.line}{bad.problem}") from None

    def _decode(self, data: bytes) -> tuple[str, int]:
        # The range starts and ends at a line end, so no character is split across ranges and decoding it
        # alone gives exactly the characters (and replacements) decoding the whole file would.
        try:
            return data.decode("utf-8"), 0
        except UnicodeDecodeError as error:
            if not self.replace_invalid_utf8:
                raise GptError(invalid_utf8_message(self.path, error.object[error.start],
                                                    self.start + error.start)) from None
        text = data.decode("utf-8", "replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())

    def _first_line(self) -> int:
        """The line number the range starts at (counted only for an error message)."""
        lines, left = 1, self.start
        with open(self.path, "rb") as handle:
            while left > 0:
                block = handle.read(min(left, 1 << 20))
                if not block:
                    break
                lines, left = lines + block.count(b"\n"), left - len(block)
        return lines


@dataclass(frozen=True)
class DatasetRows:
    source: int
    texts: list[str]

    def documents(self) -> tuple[list[str], bool]:
        return [text for text in self.texts if text], True


Task = Union[FilePiece, TextLines, TextParagraphs, JsonlRecords, FileRange, DatasetRows]


def paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines, joined by "\\n" (line ends normalized, blank lines dropped)."""
    found, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line.rstrip("\r"))
        elif current:
            found.append("\n".join(current))
            current = []
    if current:
        found.append("\n".join(current))
    return found


# The C scanner json.loads ends in, without its per-call wrapping (set by JSONDecoder.__init__, which typeshed's
# stub of JSONDecoder does not declare).
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\r\n"


def _one_json_value(line: str):
    """json.loads(line), exactly (one value, JSON whitespace around it), at about half its per-call cost:
    records of a JSONL file are short, so the wrapping around the C scanner is a large part of the work."""
    start = len(line) - len(line.lstrip(_JSON_SPACE))
    try:
        value, end = _scan_json(line, start)
    except StopIteration:
        raise ValueError("no JSON value") from None
    if line[end:].strip(_JSON_SPACE):
        raise ValueError("extra data after the JSON value")
    return value


class BadRecord(Exception):
    """A JSONL line that holds no usable record: `line` counts from 0 within the text read."""

    def __init__(self, line: int, problem: str):
        super().__init__(line, problem)
        self.line, self.problem = line, problem


# A UTF-16 surrogate on its own: JSON can write one (an escape such as "\ud800"), but it is no character,
# and neither UTF-8 nor the tokenizer can hold it. Pairs are decoded to one character by the parser.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def jsonl_records(text: str, column: str, replace_invalid: bool = False) -> list[str]:
    """The non-empty `column` strings of the JSON records of `text`, one per non-blank line. A lone
    surrogate in one is refused, or read as U+FFFD with `replace_invalid` (--replace-invalid-utf8)."""
    records = []
    for offset, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            record = _one_json_value(line)
        except ValueError:
            raise BadRecord(offset, " is not valid JSON.") from None
        if not isinstance(record, dict) or column not in record:
            raise BadRecord(offset, f" has no {column!r} field (name the text field with --text-column).")
        value = record[column]
        if not isinstance(value, str):
            raise BadRecord(offset, f": field {column!r} holds {type(value).__name__}, not text.")
        lone = LONE_SURROGATE.search(value) if "\\u" in line else None  # only an escape can write one
        if lone:
            if not replace_invalid:
                raise BadRecord(offset, f": field {column!r} holds a lone UTF-16 surrogate "
                                f"({ascii(lone.group())[1:-1]}), "
                                "which is not a character; fix the record, or pass --replace-invalid-utf8 to read it "
                                "as U+FFFD.")
            value = LONE_SURROGATE.sub("\ufffd", value)
        if value:
            records.append(value)
    return records


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
            raise GptError(f"Directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)} or .gz of those, "
                           f"{PARQUET_SUFFIX}).")
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
            if not name.startswith(".") and bare.lower().endswith((*TEXT_SUFFIXES, PARQUET_SUFFIX)):
                found.append(Path(root) / name)
    return found


def _file_source(path: Path) -> Source:
    bare = path.name[:-3] if path.name.endswith(".gz") else path.name
    kind: SourceKind = "jsonl" if bare.lower().endswith(".jsonl") else "text"
    if path.name.lower().endswith(PARQUET_SUFFIX):
        kind = "parquet"
    return Source(kind, str(path), path.stat().st_size)


# --- decoding bytes ------------------------------------------------------------------------------------------


def invalid_utf8_message(path: str, byte: int, offset: int) -> str:
    return (f"{path} is not valid UTF-8 (byte 0x{byte:02x} near offset {offset:,}); re-encode it, or pass "
            "--replace-invalid-utf8 to read such bytes as U+FFFD.")


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
                raise GptError(invalid_utf8_message(self.path, error.object[error.start],
                                                    self.offset + error.start)) from None
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


@dataclass(frozen=True)
class ReadSettings:
    """How inputs become tasks: [data] separator and text_column, task size, invalid UTF-8 handling."""

    separator: Separator = "none"
    text_column: str = "text"
    chunk_chars: int = 1 << 20
    replace_invalid_utf8: bool = False


@dataclass
class ReadState:
    """What the reader has consumed so far: for progress, the summary and the manifest."""

    disk_bytes: int = 0  # bytes of input files read from disk (compressed size for .gz)
    replaced: int = 0  # invalid UTF-8 bytes read as U+FFFD
    source: int = 0  # index of the input being read


def read_tasks(sources: list[Source], settings: ReadSettings, state: ReadState) -> Iterator[Task]:
    """Every input's tasks, in input order."""
    for index, source in enumerate(sources):
        state.source = index
        if source.kind in ("text", "jsonl"):
            yield from file_tasks(index, source, settings, state)
        elif source.kind == "parquet":
            yield from parquet_tasks(index, source, settings, state)
        else:
            yield from dataset_tasks(index, source, settings)


def file_tasks(index: int, source: Source, settings: ReadSettings, state: ReadState) -> Iterator[Task]:
    """Tasks for one text or .jsonl file, read in blocks of about `chunk_chars`."""
    mode: Union[Separator, Literal["jsonl"]] = settings.separator if source.kind == "text" else "jsonl"
    if mode in ("line", "jsonl") and not source.location.endswith(".gz"):
        yield from range_tasks(index, source, mode, settings, state)
        return
    decoder = Utf8Decoder(source.location, settings.replace_invalid_utf8)
    stream, raw = _open_binary(source.location)
    make = _task_maker(index, source, mode, settings.text_column, settings.replace_invalid_utf8)
    try:
        cutter = _Cutter(mode, settings.chunk_chars)
        for text in _decoded_blocks(stream, raw, decoder, settings.chunk_chars, state):
            for piece, closes in cutter.feed(text, final=False):
                yield make(piece, closes)
        for piece, closes in cutter.feed("", final=True):
            yield make(piece, closes)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise GptError(f"Cannot read {source.location}: {getattr(error, 'strerror', None) or error}.") from None
    finally:
        state.replaced += decoder.replaced
        stream.close()
        raw.close()


def range_tasks(index: int, source: Source, mode: Literal["line", "jsonl"], settings: ReadSettings,
                state: ReadState) -> Iterator[FileRange]:
    """Ranges of about `chunk_chars` bytes of a plain file, each ending just after a line end: only the bytes
    up to the first line end after each cut point are read here; the workers read the rest."""
    try:
        with open(source.location, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = 0
            while start < size:
                end = _line_end_after(handle, start + settings.chunk_chars, size)
                state.disk_bytes += end - start
                yield FileRange(index, source.location, start, end, mode, settings.text_column,
                                settings.replace_invalid_utf8)
                start = end
    except OSError as error:
        raise GptError(f"Cannot read {source.location}: {error.strerror or error}.") from None


def _line_end_after(handle, position: int, size: int) -> int:
    """The offset just after the first line end at or after `position`, or the file's size."""
    handle.seek(min(position, size))
    while position < size:
        block = handle.read(1 << 16)
        if not block:
            break
        found = block.find(b"\n")
        if found >= 0:
            return position + found + 1
        position += len(block)
    return size


def _task_maker(index: int, source: Source, mode: str, text_column: str, replace_invalid_utf8: bool = False):
    """piece, closes → the task of this file's mode (a JSONL task also carries its first line's number)."""
    if mode == "none":
        return lambda piece, closes: FilePiece(index, piece, closes)
    if mode == "line":
        return lambda piece, closes: TextLines(index, piece)
    if mode == "blank-line":
        return lambda piece, closes: TextParagraphs(index, piece)
    line = 1

    def jsonl(piece: str, closes: bool) -> JsonlRecords:
        nonlocal line
        task = JsonlRecords(index, piece, source.location, line, text_column, replace_invalid_utf8)
        line += piece.count("\n")
        return task

    return jsonl


def _decoded_blocks(stream, raw, decoder: Utf8Decoder, chunk_chars: int, state: ReadState) -> Iterator[str]:
    before = 0
    while True:
        block = stream.read(chunk_chars)
        position = raw.tell()
        state.disk_bytes += position - before
        before = position
        if not block:
            break
        yield decoder.decode(block)
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


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
        last = deque(pattern.finditer(self.buffer, start), maxlen=1)  # only the last match is kept
        return last[0].end() if last else None


# --- datasets ------------------------------------------------------------------------------------------------


def dataset_tasks(index: int, source: Source, settings: ReadSettings) -> Iterator[DatasetRows]:
    """Rows of a saved dataset dir or an hf: dataset, in row order, about `chunk_chars` per task."""
    texts, size = [], 0
    for text in dataset_texts(open_dataset(source.label, "train"), settings.text_column, source.label):
        texts.append(text)
        size += len(text)
        if size >= settings.chunk_chars:
            yield DatasetRows(index, texts)
            texts, size = [], 0
    if texts:
        yield DatasetRows(index, texts)


def parquet_tasks(index: int, source: Source, settings: ReadSettings, state: ReadState) -> Iterator[DatasetRows]:
    """Rows of a Parquet file's text column, PARQUET_ROWS at a time (its other columns are never read), about
    `chunk_chars` per task; the bytes on disk counted in proportion to the rows read, for the progress bar."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.location)
    except Exception as error:  # pyarrow's own kinds: not Parquet, damaged
        raise GptError(f"Cannot read {source.location} as Parquet: {_first_line(error)}.") from None
    columns = parquet.schema_arrow.names
    if settings.text_column not in columns:
        raise GptError(f"{source.location} has no column {settings.text_column!r} (columns: {', '.join(columns)}); "
                       "pass --text-column or set [data] text_column.")
    rows, done, start = max(parquet.metadata.num_rows, 1), 0, state.disk_bytes
    texts, size = [], 0
    for batch in parquet.iter_batches(batch_size=PARQUET_ROWS, columns=[settings.text_column]):
        done += batch.num_rows
        state.disk_bytes = start + source.size * done // rows
        for text in checked_texts(batch.column(0).to_pylist(), settings.text_column, source.location):
            texts.append(text)
            size += len(text)
            if size >= settings.chunk_chars:
                yield DatasetRows(index, texts)
                texts, size = [], 0
    if texts:
        yield DatasetRows(index, texts)
    state.disk_bytes = start + source.size


def checked_texts(values: list, column: str, label: str) -> Iterator[str]:
    """The strings of a column's values (missing values skipped); anything but text is one sentence."""
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise GptError(f"{label} column {column!r} holds {type(value).__name__}, not text.")
        yield value


def dataset_texts(dataset, column: str, label: str) -> Iterator[str]:
    """The strings in `column`, row by row (missing values skipped); one sentence for a wrong column."""
    columns = list(dataset.column_names or [])
    if columns and column not in columns:
        raise GptError(f"{label} has no column {column!r} (columns: {', '.join(columns)}); pass --text-column "
                       "or set [data] text_column.")
    for batch in dataset.iter(batch_size=1024):
        if column not in batch:  # a streamed dataset may not know its columns before the first rows
            raise GptError(f"{label} has no column {column!r} (columns: {', '.join(batch)}); pass --text-column "
                           "or set [data] text_column.")
        yield from checked_texts(batch[column], column, label)


def open_dataset(spec: str, split: str = "train"):
    """The one way a dataset is opened (`gpt prepare` inputs, `gpt eval --dataset`): a dir written by
    `save_to_disk` (a DatasetDict gives `split`, or its only split), else a Hub dataset named
    `hf:NAME[/CONFIG]`, `hf:OWNER/NAME/CONFIG`, `NAME:CONFIG` or `NAME`, streamed, after a quick check
    that the Hub can be reached at all."""
    if Path(spec).is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(spec)
        except Exception as error:  # datasets raises many kinds for a damaged dir
            raise GptError(f"Cannot open the saved dataset {spec}: {_first_line(error)}.") from None
        return _pick_split(loaded, spec, split) if isinstance(loaded, datasets.DatasetDict) else loaded
    name, config = hub_name(spec)
    _require_hub(spec)
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as error:  # datasets raises many kinds: missing dataset, config, split, network
        raise GptError(f"Could not open {spec} (split {split}) with datasets.load_dataset "
                       f"({type(error).__name__}: {_first_line(error)}).") from None


def hub_name(spec: str) -> tuple[str, Optional[str]]:
    """`hf:NAME/CONFIG`, `hf:OWNER/NAME/CONFIG`, `NAME:CONFIG` or `NAME` → (name, config or None)."""
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition("/")
        if "/" in config:  # owner/name/config
            owner_name, config = config.rsplit("/", 1)
            name = f"{name}/{owner_name}"
    else:
        name, _, config = spec.partition(":")
    return name, config or None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no detail"


def _pick_split(splits, spec: str, split: str):
    """A saved DatasetDict: the split asked for (held-out splits stay out of a training corpus), or the only
    one it has."""
    if split in splits:
        return splits[split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise GptError(f"{spec} holds the splits {', '.join(splits)} and none is named {split}; save the one to use "
                   "on its own.")


def _require_hub(spec: str) -> None:
    """Fail in a second, not after minutes of retries, when the Hub cannot be reached."""
    why = hub_unreachable()
    if why is not None:
        raise GptError(f"{spec} needs the Hugging Face Hub, which {why}; on a machine with network access save "
                       "it with datasets.load_dataset(...).save_to_disk(DIR) and pass DIR instead.")


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face Hub cannot be used from here (offline switch, no connection), or None."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "is switched off by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE"
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return f"cannot be reached from here ({host})"
    return None


def load_cached_dataset(name: str, config: Optional[str], split: str):
    """A whole Hub dataset split through `datasets`' own cache: the cached copy when there is one, read
    without touching the network; else downloaded (and so cached) once the Hub answers. Raises
    `HubUnreachable` (with the reason) when it is neither cached nor reachable."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # the cache alone: datasets falls back to it when offline
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception:  # not cached (or cached damaged): ask the Hub
        pass
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    why = hub_unreachable()
    if why is not None:
        raise HubUnreachable(why)
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many kinds: missing dataset, config, split, network
        raise GptError(f"Could not load {name} (split {split}) with datasets.load_dataset "
                       f"({type(error).__name__}: {_first_line(error)}).") from None


class HubUnreachable(GptError):
    """The Hub cannot be used from here; the message says why. Callers add what to do instead."""
