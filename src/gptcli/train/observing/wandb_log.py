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


def records(data: bytes, offset: int = 0) -> Iterator[bytes]:
    """The serialized protobuf Records in `data`, the bytes of a log from `offset` (0, or the start of a
    block) to its end, in order, up to a torn tail; a record that began before `offset` is left out."""
    if offset == 0 and data[:len(HEADER)] != HEADER:
        return
    position, pending = (HEADER_SIZE if offset == 0 else 0), None  # pending: a record seen to begin
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - (offset + position) % BLOCK
        if left_in_block < CHUNK_HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        end = position + CHUNK_HEADER + length
        if end > len(data) or kind not in (FULL, FIRST, MIDDLE, LAST):
            return  # the torn tail of a killed writer (or zeros it had not written yet)
        chunk, position = data[position + CHUNK_HEADER:end], end
        if kind in (FULL, FIRST):
            pending = chunk
        elif pending is not None:
            pending += chunk
        if kind in (FULL, LAST) and pending is not None:
            yield pending
            pending = None


def last_history_step(paths: list[Path]) -> int:
    """The highest step of a history record in the transaction logs `paths` (0 if none)."""
    return max((last_step_of(Path(path)) for path in paths), default=0)


def last_step_of(path: Path) -> int:
    """The step of the last history record of one log (a log's steps only grow), read from its end: the
    last few blocks, more only when they hold no history record, so a long run's resume reads kilobytes."""
    from wandb.proto import wandb_internal_pb2

    # Record is built by protobuf when the module is imported, so mypy cannot see it in wandb's source.
    record, size, window = wandb_internal_pb2.Record(), path.stat().st_size, 4 * BLOCK  # type: ignore[attr-defined]
    with path.open("rb") as handle:
        while True:
            start = max(0, (size - window) // BLOCK * BLOCK)
            handle.seek(start)
            last = 0
            for raw in records(handle.read(size - start), start):
                record.ParseFromString(raw)
                if record.WhichOneof("record_type") == "history":
                    last = record.history.step.num
            if last or start == 0:
                return last
            window *= 4


def offline_logs(wandb_dir: Path, run_id: str, exclude: Path) -> list[Path]:
    """The transaction logs of the offline run `run_id` in `wandb_dir` (one per segment: each start of the
    run writes one), but `exclude` (the segment being written)."""
    found = Path(wandb_dir).glob(f"offline-run-*/run-{run_id}.wandb")
    return sorted(path for path in found if path.resolve() != Path(exclude).resolve())
