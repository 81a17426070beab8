"""Batches read ahead by a thread are the loader's own batches, and the position a checkpoint saves is
that of the last batch used, not of the last one read ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptcli.data.loader import BatchLoader
from gptcli.data.shards import open_prepared
from gptcli.train.prefetch import BatchPrefetcher
from shard_fixture import write_shard_dir


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    write_shard_dir(tmp_path, [("train", rng.integers(0, 1000, 3000)), ("train", rng.integers(0, 1000, 2000))],
                    vocab_size=1000, fingerprint="test:1000")
    return open_prepared(tmp_path)


def loader(data) -> BatchLoader:
    return BatchLoader(data, "train", 4, 16, rank=1, world_size=2, seed=7)


def test_prefetched_batches_are_the_loaders_batches_and_the_position_is_the_last_one_used(data):
    plain, ahead = loader(data), BatchPrefetcher(loader(data), torch.device("cpu"), depth=3)
    try:
        for _ in range(100):  # 100 micro steps: several epochs of this small split
            inputs, targets = ahead.next_batch()
            expected_inputs, expected_targets = plain.next_batch()
            assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
            assert ahead.state_dict() == plain.state_dict()  # the thread has read further than this
    finally:
        ahead.close()


def test_a_resumed_prefetcher_continues_at_the_saved_position(data):
    first = BatchPrefetcher(loader(data), torch.device("cpu"))
    for _ in range(5):
        first.next_batch()
    saved = first.state_dict()
    sixth = first.next_batch()
    first.close()
    resumed = BatchPrefetcher(loader(data), torch.device("cpu"))
    resumed.load_state_dict(saved)
    try:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), sixth, strict=True))
        with pytest.raises(RuntimeError, match="cannot change"):
            resumed.load_state_dict(saved)
    finally:
        resumed.close()


def test_a_loader_error_reaches_the_training_thread(data):
    class Failing(BatchLoader):
        def next_batch(self):
            raise OSError("shard vanished")

    ahead = BatchPrefetcher(Failing(data, "train", 4, 16), torch.device("cpu"))
    with pytest.raises(OSError, match="shard vanished"):
        ahead.next_batch()
    ahead.close()
