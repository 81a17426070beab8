"""What each tracker holds, read back with the library's own reader: TensorBoard's EventAccumulator, the
protobuf records of W&B's offline run-*.wandb files (wandb.proto), MLflow's MlflowClient."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

# The framing of a run-*.wandb file (the LevelDB log format W&B writes): a 7-byte file header
# (":W&B", the magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
# (CRC32C, length, type); a record too long for a block is split into FIRST, MIDDLE..., LAST chunks.
WANDB_HEADER = b":W&B"
WANDB_BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class TensorBoardEvents:
    scalars: dict[str, list[tuple[int, float]]]  # tag → (step, value) in the order shown
    texts: dict[str, dict[int, str]]  # tag → {step: text as written}
    images: dict[str, list[int]]  # tag → steps


def tensorboard_events(run_dir: Path) -> TensorBoardEvents:
    """What TensorBoard shows of RUN/tensorboard, read as TensorBoard itself reads it (its plugin event
    accumulator, which honours a resumed writer's purge of the steps after it)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    found = TensorBoardEvents({}, {}, {})
    for tag in events.Tags()["tensors"]:
        plugin = events.SummaryMetadata(tag).plugin_data.plugin_name
        points = [(event.step, tensor_util.make_ndarray(event.tensor_proto)) for event in events.Tensors(tag)]
        if plugin == "scalars":
            found.scalars[tag] = [(step, value.item()) for step, value in points]
        elif plugin == "text":
            found.texts[tag.removesuffix("/text_summary")] = {step: unindented(value.item().decode())
                                                               for step, value in points}
        elif plugin == "images":
            found.images[tag] = [step for step, _ in points]
    return found


def unindented(text: str) -> str:
    return "\n".join(line.removeprefix("    ") for line in text.splitlines())


def wandb_records(path: Path) -> list:
    """The protobuf Records of one run-*.wandb file."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data:
        return []  # W&B was killed before it wrote anything
    assert data[:4] == WANDB_HEADER, data[:7]
    records, pending, position = [], b"", 7
    while position + CHUNK_HEADER <= len(data):
        left_in_block = WANDB_BLOCK - position % WANDB_BLOCK
        if left_in_block < CHUNK_HEADER:  # the rest of a block too short for a chunk header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        end = position + CHUNK_HEADER + length
        if end > len(data) or kind not in (FULL, FIRST, MIDDLE, LAST):
            break  # the torn tail of a killed writer
        chunk, position = data[position + CHUNK_HEADER:end], end
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@dataclass
class WandbSegment:
    """One offline run-*.wandb file: its run id, its config and its history rows by step."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: dict[int, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def wandb_segments(wandb_dir: Path) -> list[WandbSegment]:
    segments = []
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        segment = WandbSegment()
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                segment.run_id, segment.project = record.run.run_id, record.run.project
                segment.name = record.run.display_name
                segment.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                segment.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                segment.history.setdefault(record.history.step.num, {}).update(items(record.history.item))
            elif kind == "summary":
                segment.summary.update(items(record.summary.update))
        segments.append(segment)
    return segments


def items(entries) -> dict:
    """W&B's (key or nested key path, JSON value) items as a dict, nested keys joined with "/"."""
    return {entry.key or "/".join(entry.nested_key): json.loads(entry.value_json) for entry in entries}


def mlflow_runs(uri: str, experiment: str) -> list[dict]:
    """Each run of an experiment: id, name, status, params, tags, artifacts, metric histories by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = []
    for run in client.search_runs([found.experiment_id]):
        run_id = run.info.run_id
        metrics = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
        artifacts = [a.path for a in client.list_artifacts(run_id)]
        artifacts += [a.path for directory in artifacts for a in client.list_artifacts(run_id, directory)]
        runs.append({"id": run_id, "name": run.info.run_name, "status": run.info.status, "params": run.data.params,
                     "tags": run.data.tags, "metrics": metrics, "artifacts": artifacts, "client": client})
    return runs
