"""What a W&B offline run holds: the steps of the history records in its transaction logs
(`RUN/wandb/offline-run-*/run-ID.wandb`), which are what `wandb sync` uploads.

W&B's process writes that file every 15 s (its setting x_transaction_log_flush_interval), so after a
kill -9 the file holds less than the run was given; reading it tells a resumed run which steps to send
again (trackers.WandbTracker.last_step).

The file is LevelDB's log format as W&B writes it: a 7-byte header (":W&B", the magic 0xBEE1, version 0),
then 32 KiB blocks of chunks, each a 7-byte header (CRC-32C, length, type) and its bytes; a record longer
than what is left of a block goes on in the next (FIRST, MIDDLE..., LAST chunks), and the last bytes of a
block too short for a chunk header are padding. A killed writer leaves a torn tail, which is read up to.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

HEADER = b":W&B"
HEADER_SIZE = 7
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[bytes]:
    """The serialized protobuf Records of one transaction log, in order, up to a torn tail."""
    data = Path(path).read_bytes()
    if data[:len(HEADER)] != HEADER:
        return
    pending, position = b"", HEADER_SIZE
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        end = position + CHUNK_HEADER + length
        if end > len(data) or kind not in (FULL, FIRST, MIDDLE, LAST):
            return  # the torn tail of a killed writer (or zeros it had not written yet)
        chunk, position = data[position + CHUNK_HEADER:end], end
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            yield pending


def last_history_step(paths: list[Path]) -> int:
    """The highest step of a history record in the transaction logs `paths` (0 if none)."""
    from wandb.proto import wandb_internal_pb2

    last = 0
    record = wandb_internal_pb2.Record()
    for path in paths:
        for raw in records(path):
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                last = max(last, record.history.step.num)
    return last


def offline_logs(wandb_dir: Path, run_id: str, exclude: Path) -> list[Path]:
    """The transaction logs of the offline run `run_id` in `wandb_dir` (one per segment: each start of the
    run writes one), but `exclude` (the segment being written)."""
    found = Path(wandb_dir).glob(f"offline-run-*/run-{run_id}.wandb")
    return sorted(path for path in found if path.resolve() != Path(exclude).resolve())
