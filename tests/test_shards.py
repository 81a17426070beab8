"""The shard format: header, dtype by vocabulary, atomic writing, verification on open."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcli.data.shards import HEADER_BYTES, MANIFEST, ShardWriter, open_prepared, read_header, token_dtype
from gptcli.errors import GptError
from shard_fixture import write_shard_dir

FINGERPRINT = "gpt2:0123456789abcdef"


def write_dataset(directory, arrays, vocab_size=50257):
    return write_shard_dir(directory, arrays, vocab_size=vocab_size, fingerprint=FINGERPRINT, eot_id=50256)


def test_round_trip_and_header(tmp_path):
    train = np.arange(1000, dtype=np.int64) * 50 % 50257
    write_dataset(tmp_path, [("train", train), ("val", train[:10])])
    data = open_prepared(tmp_path, verify=True)
    shard = data.splits["train"][0]
    assert shard.tokens.dtype == np.uint16
    assert np.array_equal(shard.tokens, train)
    assert (shard.header.num_tokens, shard.header.vocab_size, shard.header.fingerprint) == (1000, 50257, FINGERPRINT)
    assert (tmp_path / "train_000000.bin").stat().st_size == HEADER_BYTES + 2 * 1000
    assert data.num_tokens("val") == 10


def test_large_vocab_uses_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokens = np.array([0, 70000, 99999])
    write_dataset(tmp_path, [("train", tokens)], vocab_size=100000)
    shard = open_prepared(tmp_path, verify=True).splits["train"][0]
    assert shard.tokens.dtype == np.uint32 and shard.tokens.tolist() == tokens.tolist()


def test_interrupted_writer_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path / "train_000000.bin", 50257, FINGERPRINT) as writer:
            writer.write(np.arange(10))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_directory_without_manifest_is_not_complete(tmp_path):
    with ShardWriter(tmp_path / "train_000000.bin", 50257, FINGERPRINT) as writer:
        writer.write(np.arange(10))
        writer.close()
    with pytest.raises(GptError, match="no manifest.json"):
        open_prepared(tmp_path)


@pytest.fixture
def dataset(tmp_path):
    write_dataset(tmp_path, [("train", np.arange(5000) % 50257)])
    return tmp_path, tmp_path / "train_000000.bin"


def test_truncated_shard(dataset):
    directory, shard = dataset
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(GptError, match="truncated or corrupt"):
        open_prepared(directory)


def test_bad_magic(dataset):
    directory, shard = dataset
    raw = bytearray(shard.read_bytes())
    raw[:8] = b"NOTSHARD"
    shard.write_bytes(bytes(raw))
    with pytest.raises(GptError, match="bad magic"):
        read_header(shard)


def test_checksum_mismatch_found_only_when_verifying(dataset):
    directory, shard = dataset
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 100] ^= 0x01
    shard.write_bytes(bytes(raw))
    open_prepared(directory)  # headers still agree: cheap open does not read every byte
    with pytest.raises(GptError, match="does not match the checksum"):
        open_prepared(directory, verify=True)


def test_id_outside_vocabulary(tmp_path):
    write_dataset(tmp_path, [("train", np.array([1, 2, 60000]))], vocab_size=50257)
    with pytest.raises(GptError, match="outside the vocabulary"):
        open_prepared(tmp_path, verify=True)


def test_manifest_and_header_disagree(dataset):
    directory, _ = dataset
    manifest = (directory / MANIFEST).read_text().replace('"tokens": 5000', '"tokens": 4999')
    (directory / MANIFEST).write_text(manifest)
    with pytest.raises(GptError, match="does not agree"):
        open_prepared(directory)


def test_manifest_records_the_largest_id_and_a_model_too_small_is_refused(tmp_path):
    """Shards with ids the model cannot embed crashed training at the step that read them; now opening them
    for a model names the shard in one sentence."""
    write_dataset(tmp_path, [("train", np.array([5, 50256, 7])), ("val", np.array([1, 60000]))])
    data = open_prepared(tmp_path)  # written by another tool: the header says a vocabulary of 50,257
    assert [s.max_id for s in data.splits["train"] + data.splits["val"]] == [50256, 60000]
    with pytest.raises(GptError, match=r"Shard .*val_000001\.bin holds token id 60000, outside the model's "
                                       r"vocabulary of 50,257"):
        data.check_fits(FINGERPRINT, 50257)
    data.check_fits(FINGERPRINT, 60001)


def test_a_shard_whose_ids_disagree_with_its_recorded_maximum_fails_verification(tmp_path):
    write_dataset(tmp_path, [("train", np.array([1, 2, 3]))])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"][0]["max_id"] = 2
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GptError, match="holds ids up to 3 but manifest.json records 2"):
        open_prepared(tmp_path, verify=True)
