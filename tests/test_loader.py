import numpy as np
import pytest
import torch

from gptcli.data.loader import BatchLoader
from gptcli.data.shards import open_prepared
from gptcli.data.source import PreparedSource
from gptcli.errors import GptError
from shard_fixture import write_shard_dir

FINGERPRINT = "test:0123456789abcdef"


def write_shards(directory, sizes, vocab_size=1000, fingerprint=FINGERPRINT):
    """Train shards whose token i of shard s is s * 100_000 + i, so a window shows where it came from."""
    shards = [("train", np.arange(size, dtype=np.int64) + number * 100_000) for number, size in enumerate(sizes)]
    write_shard_dir(directory, shards, vocab_size=vocab_size, fingerprint=fingerprint, name="test")
    return open_prepared(directory)


@pytest.fixture
def data(tmp_path):
    # ids are shard * 100_000 + position, so a window shows where it came from; vocab 2^20 needs uint32
    return write_shards(tmp_path, [1000, 333, 517], vocab_size=2**20)


def stream(sizes):
    """The split as the loader must read it: the shards' tokens back to back."""
    return np.concatenate([np.arange(size) + number * 100_000 for number, size in enumerate(sizes)])


def test_windows_read_the_split_as_one_stream_across_shard_ends(data):
    """Documents continue from one shard into the next, so windows run across the cut: nothing between
    shards is skipped, and the windows are exactly the stream's [i*T, i*T + T + 1)."""
    tokens = stream([1000, 333, 517])
    loader = BatchLoader(data, "train", 4, 16, seed=1, shuffle=False)
    assert loader.num_windows == (1850 - 1) // 16 == 115
    seen, crossing = [], 0
    for _ in range(loader.batches_per_epoch):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in torch.cat([inputs, targets[:, -1:]], dim=1):
            start = len(seen) * 16
            assert row.tolist() == tokens[start: start + 17].tolist()
            crossing += len(set((row // 100_000).tolist())) > 1
            seen.append(start)
    assert len(seen) == 112 and crossing == 2  # windows 62 (tokens 992..1008) and 83 (1328..1344) span a cut
    state = loader.state_dict()
    assert state["shard"] is None or state["shard"].startswith("train_")


def test_an_epoch_visits_every_window_once_in_a_seeded_order(data):
    def starts(seed, shuffle=True):
        loader = BatchLoader(data, "train", 2, 16, seed=seed, shuffle=shuffle)
        return [tuple(loader.next_batch()[0][:, 0].tolist()) for _ in range(loader.batches_per_epoch)]

    first = [s for batch in starts(7) for s in batch]
    assert len(set(first)) == len(first) == 114
    assert starts(7) == starts(7) and starts(7) != starts(8)
    ordered = [s for batch in starts(7, shuffle=False) for s in batch]
    assert ordered == sorted(ordered)


def test_resume_from_a_saved_cursor_gives_identical_batches(data):
    reference = BatchLoader(data, "train", 4, 16, seed=3)
    expected = [reference.next_batch()[0] for _ in range(70)]  # crosses into the second epoch
    first = BatchLoader(data, "train", 4, 16, seed=3)
    for _ in range(40):
        first.next_batch()
    state = first.state_dict()
    assert state["epoch"] == 1 and state["shard"].startswith("train_")
    resumed = BatchLoader(data, "train", 4, 16, seed=3)
    resumed.load_state_dict(state)
    for step in range(40, 70):
        assert torch.equal(resumed.next_batch()[0], expected[step])


def test_ranks_see_disjoint_windows_that_together_make_the_global_batch(data):
    single = BatchLoader(data, "train", 6, 16, seed=5)
    ranks = [BatchLoader(data, "train", 3, 16, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(single.batches_per_epoch):
        together = torch.cat([loader.next_batch()[0] for loader in ranks])
        starts = together[:, 0].tolist()
        assert len(set(starts)) == len(starts)
        assert torch.equal(together, single.next_batch()[0])


def step_windows(loaders, steps: int) -> list[list[int]]:
    """The sorted window indices of each of `steps` optimizer steps taken by the ranks' `loaders` together
    (each loader hands out its micro batches; a step is micro_steps_per_step of them on every rank)."""
    taken = []
    for _ in range(steps):
        micro = loaders[0].micro_steps_per_step
        taken.append(sorted(int(i) for _ in range(micro) for loader in loaders for i in loader.next_windows()))
    return taken


def loaders_for(data, world: int, windows_per_step: int = 12, micro_batch_size: int = 2):
    return [BatchLoader(data, "train", micro_batch_size, 16, rank=r, world_size=world, seed=5,
                        windows_per_step=windows_per_step) for r in range(world)]


def test_an_optimizer_step_takes_the_same_windows_however_ranks_and_accumulation_divide_it(data):
    """12 windows per step as 1 rank × 6 micro batches of 2, 2 × 3, 3 × 2 or 6 × 1, over three epochs of 115
    windows (9 steps each, 7 left over): every step takes the same windows, and an epoch ends at a step,
    not at a micro batch (with the leftover counted per micro batch, 1 rank would take 3 more batches of the
    old epoch where 6 ranks start the next)."""
    reference = step_windows(loaders_for(data, 1), 27)
    assert all(len(set(step)) == 12 for step in reference)
    assert len({i for step in reference[:9] for i in step}) == 108  # one epoch: 9 steps, no window twice
    for world in (2, 3, 6):
        assert step_windows(loaders_for(data, world), 27) == reference, world


def test_a_saved_position_resumes_on_other_ranks_with_the_windows_that_follow(data):
    reference = step_windows(loaders_for(data, 1), 20)
    saving = loaders_for(data, 2)
    assert step_windows(saving, 11) == reference[:11]  # into the second epoch
    state = saving[0].state_dict()
    assert state["epoch"] == 1 and state["windows_per_step"] == 12 and state["micro"] == 0
    resumed = loaders_for(data, 3)
    for loader in resumed:
        loader.load_state_dict(state)
    assert step_windows(resumed, 9) == reference[11:]


def test_resume_over_other_data_is_refused(data):
    state = BatchLoader(data, "train", 4, 16, seed=3).state_dict()
    other = BatchLoader(data, "train", 4, 8, seed=3)  # another seq_len: other windows
    with pytest.raises(GptError, match="num_windows"):
        other.load_state_dict(state)


def test_a_split_shorter_than_one_batch_is_refused(tmp_path):
    data = write_shards(tmp_path, [100], vocab_size=2**20)
    with pytest.raises(GptError, match="fewer than one batch"):
        BatchLoader(data, "train", 8, 16)
    with pytest.raises(GptError, match='"val" split'):
        BatchLoader(data, "val", 1, 16)


def test_shards_of_another_tokenizer_or_a_larger_vocab_are_refused(tmp_path):
    source = PreparedSource(write_shards(tmp_path, [100], vocab_size=50257))
    with pytest.raises(GptError, match="tokenizer"):
        source.check_tokenizer("gpt2:ffffffffffffffff", 50257)
    with pytest.raises(GptError, match="model.vocab_size"):
        source.check_tokenizer(FINGERPRINT, 50000)
    source.check_tokenizer(FINGERPRINT, 50304)


def test_sequential_eval_batches_are_the_same_every_time_and_split_by_rank(data):
    loader = BatchLoader(data, "train", 2, 16, seed=5)
    a = [x for x, _ in loader.sequential_batches(3)]
    b = [x for x, _ in loader.sequential_batches(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and len(a) == 3
    r0 = BatchLoader(data, "train", 2, 16, rank=0, world_size=2)
    r1 = BatchLoader(data, "train", 2, 16, rank=1, world_size=2)
    s0 = {t for x, _ in r0.sequential_batches(100) for t in x[:, 0].tolist()}
    s1 = {t for x, _ in r1.sequential_batches(100) for t in x[:, 0].tolist()}
    assert s0 and s1 and not s0 & s1


def test_an_id_outside_the_vocabulary_is_one_sentence_naming_the_shard(tmp_path):
    """A shard changed after it was prepared (its manifest still says it fits): the batch that reads the bad
    id stops training with a sentence, not an index error deep inside the embedding."""
    write_shard_dir(tmp_path, [("train", np.arange(200) % 1000), ("train", np.arange(200) % 1000)], vocab_size=1000,
                    fingerprint=FINGERPRINT, name="test")
    shard = tmp_path / "train_000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[-40:-38] = (4000).to_bytes(2, "little")  # id 180 of the second shard
    shard.write_bytes(bytes(raw))
    loader = BatchLoader(open_prepared(tmp_path), "train", 2, 16, shuffle=False)
    read = 0
    with pytest.raises(GptError, match=r"train_000001\.bin holds token id 4000, outside the vocabulary of 1,000"):
        for _ in range(loader.batches_per_epoch):
            loader.next_batch()
            read += 1
    assert read == (200 + 180) // 32  # the batches before the bad id were served
