"""Where a benchmark's records come from: the Hub dataset lm-eval reads (through `datasets`, cached as it
caches), or a local JSONL or Parquet file with the same fields, for machines without the network.

Every record is checked as it becomes an Example, and a bad one is named by where it is: the file and
line (JSONL) or row (Parquet), or the dataset and example number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import GptError
from ..parsing import TooLarge, one_json_value
from ..paths import check_input
from .benchmarks import Benchmark, Example

LOCAL_FORMATS = "a .jsonl (JSON Lines) or .parquet file"


@dataclass
class Records:
    rows: list[dict]
    where: list[str]  # for each row: how a message names it
    source: str  # for reports: the file, or the dataset and split


def read_examples(bench: Benchmark, data_file: Optional[Path | str], limit: int = 0) -> tuple[list[Example], str]:
    """The benchmark's examples (the first `limit` when > 0), from `data_file` or else the Hub, and a
    description of where they came from."""
    records = read_local(data_file) if data_file is not None else read_hub(bench)
    if not records.rows:
        raise GptError(f"{records.source} holds no examples.")
    count = min(limit, len(records.rows)) if limit > 0 else len(records.rows)
    examples = []
    for index in range(count):
        row, where = records.rows[index], records.where[index]
        if not isinstance(row, dict):
            raise GptError(f"{where} is not a record with fields but {type(row).__name__}.")
        missing = [name for name in bench.fields if name not in row]
        if missing:
            raise GptError(f"{where} has no field {', '.join(repr(m) for m in missing)} ({bench.title} records "
                           f"need {', '.join(bench.fields)}).")
        examples.append(bench.example(row, index, where))
    return examples, records.source


def check_local(path: Path | str) -> Path:
    """A local task data file that exists and has a readable format (cheap: pre-flight asks it too)."""
    path = Path(path)
    if not path.exists():
        raise GptError(f"Task data file {path} does not exist.")
    if path.is_dir():
        raise GptError(f"Task data {path} is not a file; give {LOCAL_FORMATS}.")
    check_input(path, "Task data")  # a regular file: never a device or a FIFO
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".parquet"):
        raise GptError(f"Task data {path} must be {LOCAL_FORMATS} with the hub dataset's fields.")
    return path


def read_local(path: Path | str) -> Records:
    path = check_local(path)
    return read_parquet(path) if path.suffix.lower() == ".parquet" else read_jsonl(path)


def read_jsonl(path: Path) -> Records:
    rows, where = [], []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(one_json_value(line))
                except TooLarge as bound:
                    raise GptError(f"{path} line {number} is not read: {bound}.") from None
                except ValueError as error:  # json.JSONDecodeError names the column
                    raise GptError(f"{path} line {number} is not JSON ({getattr(error, 'msg', error)}).") from None
                where.append(f"{path} line {number}")
    except UnicodeDecodeError:
        raise GptError(f"{path} is not UTF-8 text.") from None
    except OSError as error:
        raise GptError(f"Cannot read {path}: {error.strerror}.") from None
    return Records(rows, where, str(path))


def read_parquet(path: Path) -> Records:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise GptError(f"Cannot read {path} as Parquet ({str(error).strip().splitlines()[0]}).") from None
    return Records(rows, [f"{path} row {number}" for number in range(1, len(rows) + 1)], str(path))


def read_hub(bench: Benchmark) -> Records:
    """The dataset and split lm-eval reads, from `datasets`' cache or the Hub."""
    from ..data.sources import HubUnreachable, load_cached_dataset

    hub = getattr(bench, "hub", None)  # a plugin's task may have none
    if hub is None:
        raise GptError(f"{bench.title} has no Hugging Face dataset to read; give its data with --task-data FILE or "
                       f"[eval] task_data ({LOCAL_FORMATS} with the fields {', '.join(bench.fields)}).")
    name, config, split = hub
    try:
        dataset = load_cached_dataset(name, config, split)
    except HubUnreachable as why:
        raise GptError(f"{bench.title} comes from the Hugging Face dataset {name} ({split}), which is not in the "
                       f"datasets cache and the Hub {why}; pass --task-data FILE ({LOCAL_FORMATS} with that "
                       "dataset's fields).") from None
    source = f"{name} ({split})"
    rows = dataset.to_list()
    return Records(rows, [f"{source} example {number}" for number in range(len(rows))], source)
