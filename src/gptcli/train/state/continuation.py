"""What a run continues from, decided on every rank before anything slow: a random init, weights
(`[train] init_from`), or a checkpoint of its own run dir, possibly saved by another number of ranks.

`prepare` reads only small files (client_state.json, config.json, the shards' manifest; the sha256 of the
init_from weights on rank 0) and returns the project the run trains:
- [model] from the source when there is one: init_from's config on a fresh start, the checkpoint's on a
  resume of a run that started from weights (the source is never read again). A key the project sets
  that would change the architecture and differs from the source is one sentence naming the key and both
  values; the others (dropout, vocab_multiple, ...) are the project's.
- the batch of the checkpoint, when resuming on another number of ranks with the batch settings it was
  trained with: the tokens per optimizer step stay, the gradient accumulation adapts
  (`train.global_batch_tokens` is set to them). When no accumulation keeps them, one sentence says so.
`describe` says what the run continues from, for the plan printed before training.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...config import ModelConfig, Project
from ...errors import GptError
from . import checkpoint
from .warmstart import WeightsSource, check_sha256, find_source, weights_sha256

BATCH_KEYS = ("micro_batch_size", "grad_accum_steps", "global_batch_tokens", "seq_len")


@dataclass
class Start:
    """How a run begins: `project` is the one it trains (see the module doc)."""

    project: Project
    ranks: int
    config_hash: str  # of the project as given, so a resume compares like with like
    batch_settings: dict  # the project's own batch keys, recorded with each checkpoint
    tag: Optional[str] = None  # the checkpoint resumed
    step: int = 0
    saved_ranks: Optional[int] = None
    saved_accumulation: Optional[int] = None
    client: Optional[dict] = None  # the client state of checkpoint `tag`
    weights: Optional[WeightsSource] = None  # a fresh start from init_from
    init_from: Optional[dict] = None  # {"source", "location", "path", "sha256"}: the weights it started from
    notes: list[str] = field(default_factory=list)

    @property
    def ranks_changed(self) -> bool:
        return self.tag is not None and self.saved_ranks != self.ranks

    def client_state(self) -> dict:
        """What each checkpoint records of the start (loop.save adds it to the client state)."""
        return {"model": dataclasses.asdict(self.project.model), "batch_settings": self.batch_settings,
                "init_from": self.init_from}


def prepare(project: Project, resume: str, ranks: int) -> Start:
    """The start of this run (`resume`: auto|required|never, as the run will decide it)."""
    start = Start(project=project, ranks=ranks, config_hash=checkpoint.config_hash(project),
                  batch_settings={key: getattr(project.train, key) for key in BATCH_KEYS})
    found = checkpoint_to_resume(project, resume)
    if found is not None:
        continue_checkpoint(start, *found)
    elif project.train.init_from is not None:
        continue_weights(start)
    return start


def checkpoint_to_resume(project: Project, resume: str) -> Optional[tuple[str, dict]]:
    """The checkpoint the run will resume (the first intact candidate, as checkpoint.find_resume picks it,
    quietly) and its client state; None for a fresh start."""
    if resume == "never":
        return None
    run_dir = Path(project.project.out_dir)
    root = checkpoint.checkpoints_dir(run_dir)
    for tag in checkpoint.resume_candidates(run_dir):
        if not checkpoint.check_checkpoint(root / tag):
            return tag, checkpoint.read_client_state(run_dir, tag)
    return None


def continue_checkpoint(start: Start, tag: str, client: dict) -> None:
    project = start.project
    start.tag, start.step, start.client = tag, int(client["step"]), client
    start.saved_ranks = int(client.get("world_size", start.ranks))
    start.init_from = client.get("init_from")
    project = checkpoint_project(project, client, tag)
    if start.init_from and project.train.init_from is not None:  # what the run started from, as first resolved
        project = with_train(project, init_from=start.init_from.get("location", project.train.init_from),
                             init_from_sha256=start.init_from["sha256"])
    start.project = keep_batch(project, start, client)


def checkpoint_project(project: Project, client: dict, tag: str) -> Project:
    """A run that started from weights takes [model] from its own checkpoint, never from the source again;
    any other run keeps the project's (checkpoint.check_architecture compares it)."""
    if project.train.init_from is None:
        return project
    saved = {**dataclasses.asdict(project.model), **client.get("architecture", {}), **client.get("model", {})}
    return with_model(project, resolve_model(project, ModelConfig(**saved), f"checkpoint {tag}"))


def continue_weights(start: Start) -> None:
    project = start.project
    assert project.train.init_from is not None, "only a run that starts from weights continues them"
    source = find_source(project.train.init_from, Path(project.project.out_dir))
    check_tokenizer(source, project)
    if os.environ.get("RANK", "0") == "0":  # rank 0 prints and records it; the others need not read the file twice
        source.sha256 = weights_sha256(source.files)
        check_sha256(source, project.train.init_from_sha256)
    model = resolve_model(project, source.config, f'train.init_from "{source.name}"')
    start.weights = source
    start.init_from = {"source": source.name, "location": source.location, "path": str(source.path),
                       "sha256": source.sha256}
    # config.resolved.toml names the model dir it resolved to (a run dir's model/, an absolute path)
    start.project = with_train(with_model(project, model), init_from=source.location, init_from_sha256=source.sha256)


def check_tokenizer(source: WeightsSource, project: Project) -> None:
    from ...data.source import open_source

    data = open_source(project.data)
    if data.fingerprint != source.tokenizer_fingerprint:
        raise GptError(f'train.init_from "{source.name}" was trained with the {source.tokenizer_name} tokenizer '
                       f"({source.tokenizer_fingerprint}), but the shards in {data.description} were made with "
                       f"{data.fingerprint}; prepare the data with the model's tokenizer.")


def resolve_model(project: Project, source: ModelConfig, where: str) -> ModelConfig:
    """The source's [model], with the keys the project sets; a set key that would change the architecture
    must agree with the source."""
    values = dataclasses.asdict(source)
    architecture = source.architecture_dict()
    for key in values:
        if f"model.{key}" not in project.given:
            continue
        mine = getattr(project.model, key)
        if key in architecture and mine != architecture[key]:
            raise GptError(f"model.{key} is {mine!r} in the project but {architecture[key]!r} in {where}; leave it "
                           "out of [model] (the weights decide the architecture) or make the two agree.")
        values[key] = mine
    return ModelConfig(**values)


def with_model(project: Project, model: ModelConfig) -> Project:
    return dataclasses.replace(project, model=model)


def with_train(project: Project, **values) -> Project:
    return dataclasses.replace(project, train=dataclasses.replace(project.train, **values))


# --- the batch of a checkpoint ------------------------------------------------------------------------------


def keep_batch(project: Project, start: Start, client: dict) -> Project:
    """Resuming with the batch settings the checkpoint was trained with, but on other ranks: keep its
    sequences per optimizer step by adapting the accumulation. Settings changed since: the project decides,
    as on a resume with the same ranks."""
    from ...batch import batch_layout

    saved = saved_sequences_per_step(client, project)
    assert start.saved_ranks is not None, "a checkpoint's ranks are read before its batch"
    recorded = client.get("batch_settings")  # older checkpoints have none: they resumed on the same ranks only
    unchanged = start.ranks_changed if recorded is None else recorded == start.batch_settings
    if saved is None or not unchanged:
        return project
    layout = batch_layout(project.train, project.seq_len, start.ranks)
    start.saved_accumulation = saved // (project.train.micro_batch_size * start.saved_ranks)
    if layout.sequences_per_step == saved:
        return project
    per_micro_step = layout.micro_batch_size * start.ranks
    if saved % per_micro_step:
        raise GptError(f"Checkpoint {start.tag} was trained with {saved} sequences per step ({layout.micro_batch_size} "
                       f"per micro batch × {start.saved_accumulation} accumulated × {start.saved_ranks} ranks), "
                       f"which {start.ranks} ranks cannot keep with micro batches of {layout.micro_batch_size}: resume "
                       f"on a number of ranks that divides {saved // layout.micro_batch_size}, or set "
                       "train.global_batch_tokens (or train.micro_batch_size) to choose another batch.")
    start.notes.append(f"gradient accumulation {start.saved_accumulation} → {saved // per_micro_step} keeps its "
                       f"{saved} sequences per step")
    return with_train(project, global_batch_tokens=saved * layout.seq_len)


def saved_sequences_per_step(client: dict, project: Project) -> Optional[int]:
    """The checkpoint's sequences per optimizer step: recorded by its loader, else (older checkpoints)
    its tokens over its steps."""
    recorded = client.get("loader", {}).get("windows_per_step")
    if recorded is not None:
        return int(recorded)
    seq_len = project.train.seq_len or project.model.block_size
    step, tokens = int(client.get("step", 0)), int(client.get("tokens", 0))
    return tokens // (step * seq_len) if step and tokens % (step * seq_len) == 0 else None


# --- what it says -----------------------------------------------------------------------------------------------


def describe(start: Start) -> list[str]:
    """The plan's line about what the run continues from (none for a random init)."""
    if start.weights is not None:
        digest = f"sha256 {start.weights.sha256}" if start.weights.sha256 else "sha256 not read on this rank"
        return [f"  from weights: train.init_from {start.weights.name} = {start.weights.path} ({digest}); step 0, "
                "a fresh optimizer and schedule"]
    if start.tag is None:
        return []
    ranks = f"saved on {plural(start.saved_ranks, 'rank')}, resuming on {start.ranks}"
    if start.ranks_changed and start.project.deepspeed.zero_stage > 0:
        ranks += (f" (its ZeRO-{start.project.deepspeed.zero_stage} partitions are re-split through DeepSpeed's "
                  "universal checkpoint format")
        ranks += f"; {'; '.join(start.notes)})" if start.notes else ")"
    elif start.notes:
        ranks += f" ({'; '.join(start.notes)})"
    started = f"; the run started from weights {start.init_from['source']}" if start.init_from else ""
    return [f"  from checkpoint {start.tag} (step {start.step:,}), {ranks}{started}"]


def plural(count: Optional[int], word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"
