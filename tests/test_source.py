"""The data source (gptcli.data.source): training's loaders, pre-flight's checks, `gpt eval --split` and the
tests' probes ask it about the training data, never a directory, so another kind of source (a mixture)
can stand behind the same questions."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from gptcli.batch import BatchLayout
from gptcli.config import apply_overrides, project_from_dict
from gptcli.data import source as data_source
from gptcli.data.source import DataSource, PreparedSource, open_source
from gptcli.errors import GptError
from shard_fixture import write_shard_dir

FINGERPRINT = "test:0123456789abcdef"


@pytest.fixture
def shards(tmp_path):
    """Train 1,000 + 333 tokens over two shards, val 150: ids below 1,000."""
    write_shard_dir(tmp_path / "data", [("train", np.arange(1000) % 997), ("train", np.arange(333)),
                                        ("val", np.arange(150))], vocab_size=1000, fingerprint=FINGERPRINT, name="t")
    return tmp_path / "data"


def project(shards, *overrides: str):
    return project_from_dict(apply_overrides({"model": {"preset": "nano", "vocab_size": 1000}},
                                             [f'data.dir="{shards}"', "train.micro_batch_size=4", *overrides]))


def test_the_source_counts_the_windows_its_loaders_read(shards):
    source = open_source(project(shards).data)
    assert (source.tokens("train"), source.tokens("val"), source.tokens("test")) == (1333, 150, 0)
    layout = BatchLayout(micro_batch_size=4, grad_accum_steps=2, world_size=2, seq_len=16)
    train = source.train_loader(layout, rank=1, seed=3, shuffle=True)
    assert source.windows("train", 16) == train.num_windows == 1332 // 16
    assert train.windows_per_step == layout.sequences_per_step == 16 and train.rank == 1
    val = source.val_loader(layout, rank=0, seed=3)
    assert source.windows("val", 16) == val.num_windows == 9 and val.batch == source.evaluation_batch(layout) == 4
    assert source.evaluation_batch(BatchLayout(8, 1, 2, 16)) == 4  # 9 windows over 2 ranks: 4 each, not 8
    assert source.val_loader(BatchLayout(8, 1, 2, 128), rank=0, seed=3) is None  # 1 window: none for rank 1
    source.check_train_batch(BatchLayout(8, 1, 10, 16))  # 80 of the 83 windows
    with pytest.raises(GptError, match=r'"train" split of .* has 1,333 tokens: fewer than one batch of 8 sequences '
                                       r"× 17 tokens on each of 11 rank\(s\)"):
        source.check_train_batch(BatchLayout(8, 1, 11, 16))


def test_a_loader_tells_its_observers_each_micro_batch_it_hands_out(shards):
    loader = open_source(project(shards).data).train_loader(BatchLayout(4, 1, 1, 16), rank=0, seed=1, shuffle=True)
    seen = []
    loader.observe(seen.append)
    handed_out = [loader.next_windows().tolist() for _ in range(25)]  # 83 windows: an epoch is 20 micro batches
    assert [record["windows"] for record in seen] == handed_out
    assert [record["epoch"] for record in seen] == [0] * 20 + [1] * 5


def test_eval_scores_a_split_as_the_source_cuts_it(shards):
    source = open_source(project(shards).data)
    sequences = source.sequences("train", vocab_size=1000)
    assert [len(s) for s in sequences] == [1000, 333]  # a prepared dir: each shard one sequence
    cut = source.sequences("train", vocab_size=1000, max_tokens=1100)
    assert [len(s) - 1 for s in cut] == [999, 101]  # tokens scored: all but each sequence's first
    with pytest.raises(GptError, match="holds token id 996, outside the vocabulary of 500"):
        source.sequences("train", vocab_size=500)


class Renamed(PreparedSource):
    """Another kind of source, as far as its users can tell: it names itself differently."""

    def __init__(self, data):
        super().__init__(data)
        self.description = "the mixture of a test"


def test_training_preflight_eval_and_resume_ask_the_source_not_the_directory(shards, monkeypatch):
    from gptcli.evaluate import split_sequences
    from gptcli.train import loop, preflight
    from gptcli.train.state import continuation

    made = []
    monkeypatch.setattr(data_source, "open_source", lambda config: made.append(config) or Renamed(
        data_source.open_prepared(config.dir)))
    small = project(shards, "train.micro_batch_size=100")
    plan = preflight.plan_on(small, preflight.Machine("cpu", 1, "fp32", cpu_flops=1e11), None)
    with pytest.raises(GptError, match='The "train" split of the mixture of a test has 1,333 tokens'):
        preflight.check_data(small, plan)
    tokenizer = type("Tokenizer", (), {"fingerprint": FINGERPRINT, "vocab_size": 1000})()
    assert split_sequences(project(shards), "val", tokenizer)[1] == "the mixture of a test (val)"
    weights = type("Weights", (), {"name": "w", "tokenizer_name": "other", "tokenizer_fingerprint": "other:0"})()
    with pytest.raises(GptError, match="but the shards in the mixture of a test were made with"):
        continuation.check_tokenizer(weights, project(shards))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    layout = BatchLayout(4, 1, 1, 64)
    no_val = Renamed(data_source.open_prepared(shards))
    monkeypatch.setattr(no_val, "tokens", lambda split: 0 if split == "val" else 1333)
    assert loop.make_loaders(project(shards), no_val, layout, 0, overfit=False)[1] == {}
    assert "note: the mixture of a test has no val shards" in sys.stderr.getvalue()
    assert len(made) == 3 and isinstance(made[0].dir, str)


def test_a_source_is_the_questions_a_mixture_must_answer():
    """DataSource's abstract questions are what the next kind of source implements; the rules on top are
    written once, on those answers."""
    assert DataSource.__abstractmethods__ == {"fingerprint", "check_tokenizer", "tokens", "windows", "loader",
                                              "sequences", "directories", "evaluated_parts"}
    with pytest.raises(TypeError):
        DataSource()
