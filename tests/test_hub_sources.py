"""The corpora a mixture is built from, as the Hub holds them: a dataset's Parquet files downloaded as they are
stored (`huggingface-cli download`, e.g. wikimedia/wikipedia's 20231101.en/*.parquet) prepared offline, and an
`hf:` dataset streamed, read a bounded piece at a time whatever its size. No network: the Hub's side is local
Parquet files and a generator."""

from __future__ import annotations

import numpy as np
import pytest
import tiktoken

from gptcli.config import load_project
from gptcli.data.prepare import PrepareOptions, prepare
from gptcli.data.shards import open_prepared
from gptcli.data.sources import ReadSettings, ReadState, read_tasks, resolve_inputs
from gptcli.errors import GptError

EOT = 50256


def tokens_of(directory) -> list[int]:
    data = open_prepared(directory, verify=True)
    return np.concatenate([s.tokens for s in data.splits["train"]]).tolist()


def options(inputs, out, *overrides) -> PrepareOptions:
    return PrepareOptions.from_project(load_project(None, ["data.val_fraction=0", *overrides]), [str(i) for i in inputs],
                                       out)


@pytest.fixture
def snapshot(tmp_path):
    """A Hub dataset's layout: CONFIG/train-0000N-of-00002.parquet, with the columns wikimedia/wikipedia has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = tmp_path / "wikipedia" / "20231101.en"
    config.mkdir(parents=True)
    articles = [f"Article {n} is about the number {n}.\n\nIt has a second paragraph." for n in range(3000)]
    articles[7] = None  # a missing value is skipped, as in a datasets dir
    for part, rows in enumerate((articles[:1800], articles[1800:])):
        table = pa.table({"id": [str(n) for n in range(len(rows))], "url": ["u"] * len(rows),
                          "title": ["t"] * len(rows), "text": rows})
        pq.write_table(table, config / f"train-0000{part}-of-00002.parquet", row_group_size=500)
    return config, [a for a in articles if a is not None]


def test_a_downloaded_hub_dataset_of_parquet_files_is_prepared_row_by_row(snapshot, tmp_path):
    config, articles = snapshot
    encoding = tiktoken.get_encoding("gpt2")
    summary = prepare(options([config], tmp_path / "wiki"))
    assert [count.documents for count in summary.inputs] == [1799, 1200]
    assert tokens_of(tmp_path / "wiki") == [i for a in articles for i in encoding.encode_ordinary(a) + [EOT]]
    manifest = open_prepared(tmp_path / "wiki").manifest
    assert {entry["kind"] for entry in manifest["inputs"]} == {"parquet"}
    with pytest.raises(GptError, match=r"has no column 'content' \(columns: id, url, title, text\); pass --text-column"):
        prepare(options([config], tmp_path / "other", 'data.text_column="content"'))


def test_parquet_rows_are_read_a_bounded_piece_at_a_time(snapshot):
    config, _ = snapshot
    sources = resolve_inputs([str(config)])
    state = ReadState()
    tasks = read_tasks(sources, ReadSettings("none", "text", 4000, False), state)
    first = next(tasks)
    assert 4000 <= sum(map(len, first.texts)) < 4000 + 100  # about chunk_chars, not the file
    assert 0 < state.disk_bytes < sources[0].size  # progress counts what was read so far
    for _ in tasks:
        pass
    assert state.disk_bytes == sum(source.size for source in sources)


def test_a_streamed_hub_dataset_is_read_as_it_streams(monkeypatch, tmp_path):
    """hf:NAME is opened with streaming=True and read in tasks of about chunk_chars: the first task is ready
    once its rows have streamed in, long before the dataset's end."""
    import datasets

    from gptcli.data import sources

    produced = []

    def rows():
        for n in range(100_000):
            produced.append(n)
            yield {"text": f"row {n} of a corpus too large to hold"}

    streamed = datasets.IterableDataset.from_generator(rows)
    asked = {}

    def load_dataset(name, config, split, streaming):
        asked.update(name=name, config=config, split=split, streaming=streaming)
        return streamed

    monkeypatch.setattr(sources, "_require_hub", lambda spec: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tasks = read_tasks(resolve_inputs(["hf:wikimedia/wikipedia/20231101.en"]), ReadSettings("none", "text", 4000, False),
                       ReadState())
    first = next(tasks)
    assert asked == {"name": "wikimedia/wikipedia", "config": "20231101.en", "split": "train", "streaming": True}
    assert first.texts[0] == "row 0 of a corpus too large to hold" and sum(map(len, first.texts)) < 4100
    assert len(produced) <= 2 * 1024  # one batch of rows read ahead at most, of the 100,000


def test_after_preparing_a_source_the_next_command_is_the_mixtures_own():
    from pathlib import Path

    from gptcli.config import project_from_dict
    from gptcli.data.prepare import next_command

    mixture = project_from_dict({"data": {"sources": [{"name": "books", "dir": "data/books", "weight": 0.7},
                                                      {"name": "wiki", "dir": "data/wiki", "weight": 0.3}]}},
                                source="books-wiki.toml")
    assert next_command(Path("data/wiki"), mixture) == "gpt train --project books-wiki.toml"
    assert next_command(Path("data/news"), mixture) == ('add { name = "...", dir = "data/news", weight = ... } to the '
                                                         "[[data.sources]] of books-wiki.toml, then gpt train "
                                                         "--project books-wiki.toml")
