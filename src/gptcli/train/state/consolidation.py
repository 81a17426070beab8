"""Handing the weights over: after training, rank 0 writes the latest checkpoint's fp32 master weights as
RUN/model (consolidate) and draws loss.png; `gpt train --consolidate` does the same for a run that stopped.

The master weights are read offline from the checkpoint's files, whatever the precision and ZeRO stage
(full_state_dict): under bf16/fp16 the module's own weights are low-precision copies, and DeepSpeed keeps
the masters with the optimizer, in a layout that depends on the stage and the optimizer.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from ...config import ModelConfig, Project
from ...errors import GptError
from ..engine import device_type, prepare_environment
from ..launching.importing import import_deepspeed
from ..launching.lock import RunDirClaim
from ..observing.metrics import plot_losses
from . import checkpoint


def hand_over(project: Project, run_dir: Path, tokenizer, step: int, exit_code: int) -> Optional[Path]:
    """Rank 0, at the end of a run: consolidate when it finished (a stopped run keeps its checkpoint for
    `--resume`), draw the loss curve, and say where everything is. Returns the model dir, if written."""
    tag = checkpoint.read_latest(run_dir)
    model_dir = None
    if exit_code == 0 and tag is not None:
        try:
            model_dir = consolidate(run_dir, tag, project.model, tokenizer)
        except GptError as refused:  # RUN/model changed during the run (checked at its start)
            raise GptError(f"{refused} The run itself is saved (checkpoint {tag}); once {run_dir / 'model'} is "
                           "cleared, `gpt train --consolidate` writes the model.") from None
    try:
        plot_losses(run_dir)
    except GptError as error:  # the plot is a convenience: the run is saved and consolidated
        print(f"warning: no loss plot: {error}", file=sys.stderr)
    where = f"; model in {model_dir}" if model_dir else ""
    reason = f" (stopped by signal {exit_code - 128})" if exit_code else ""
    print(f"Finished at step {step}{reason}: run dir {run_dir}{where}.", file=sys.stderr)
    return model_dir


@contextmanager
def model_dir_for(path: Path) -> Iterator[Path]:
    """`--checkpoint` of generate, eval and export-hf: a model dir or a run dir as it is; a checkpoint of a run
    (RUN/checkpoints/step_N: users pick the best one) consolidated on the fly into a temporary model dir,
    removed after the block. Its [model] and tokenizer are the run's (client state, config.resolved.toml)."""
    from ...rundir import checkpoint_of

    found = checkpoint_of(path)
    if found is None:
        yield Path(path)
        return
    run_dir, tag = found
    problems = checkpoint.check_checkpoint(Path(path))
    if problems:
        raise GptError(f"Checkpoint {path} is damaged ({'; '.join(problems)}); give another one.")
    config, tokenizer = checkpoint_model(run_dir, tag)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's offline reader: no accelerator needed
    with tempfile.TemporaryDirectory(prefix="gptcli-checkpoint-") as scratch:
        yield consolidate(run_dir, tag, config, tokenizer, out_dir=Path(scratch) / "model")


def checkpoint_model(run_dir: Path, tag: str):
    """The [model] a checkpoint was trained with and the run's tokenizer."""
    from ...config import load_project, project_from_dict
    from ...rundir import RESOLVED_CONFIG
    from ...tokenizer import load_tokenizer

    resolved = Path(run_dir) / RESOLVED_CONFIG
    if not resolved.is_file():
        raise GptError(f"{run_dir} has no {RESOLVED_CONFIG}, which says how checkpoint {tag} was trained; give a "
                       "model dir instead (gpt train --consolidate writes one).")
    project = load_project(resolved)
    saved = checkpoint.read_client_state(run_dir, tag).get("model")
    config = project_from_dict({"model": saved}).model if isinstance(saved, dict) else project.model
    return config, load_tokenizer(project.data.tokenizer, project.data.vocab_dir)


def consolidate_only(project: Project) -> Path:
    """`gpt train --consolidate`: the latest checkpoint of the run dir → RUN/model, without training."""
    from ...tokenizer import load_tokenizer
    from .continuation import checkpoint_project

    prepare_environment(device_type(project))
    run_dir = Path(project.project.out_dir)
    tag = checkpoint.read_latest(run_dir)
    if tag is None:
        raise GptError(f"{checkpoint.checkpoints_dir(run_dir)} has no complete checkpoint to consolidate.")
    client = checkpoint.read_client_state(run_dir, tag)
    project = checkpoint_project(project, client, tag)  # a run started from weights: [model] from its checkpoint
    checkpoint.check_architecture(client, project.model, tag)
    tokenizer = load_tokenizer(project.data.tokenizer, project.data.vocab_dir)
    with RunDirClaim() as claim:  # RUN/model must not be written under a running training
        claim.take(run_dir, rank=0)
        return consolidate(run_dir, tag, project.model, tokenizer)


# --- the fp32 master weights of a checkpoint -----------------------------------------------------------------


def full_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint, read offline, whatever the precision and ZeRO stage.

    Under bf16/fp16 the module's own weights are low-precision copies; the masters live with the optimizer:
    - ZeRO 1-3: the optimizer partitions `zero_pp_rank_*` (`bf16_zero_pp_rank_*` under bf16), merged by
      deepspeed.utils.zero_to_fp32; bf16 ZeRO-1 with fp32 gradient accumulation is DeepSpeed's
      BF16_Optimizer, whose partitions that merge does not read (no zero_stage key), so they are merged here;
    - ZeRO 0: `mp_rank_00_model_states.pt`, whose optimizer state holds the fp16/bf16 optimizer's masters;
      in fp32 the module's weights are the masters.
    """
    import_deepspeed()  # the checkpoint's pickles name DeepSpeed's classes
    directory = checkpoint.checkpoints_dir(run_dir) / tag
    partitions = sorted(directory.glob("*zero_pp_rank_*_optim_states.pt"), key=partition_rank)
    if not partitions:
        state = stage0_masters(directory)
    elif "zero_stage" in torch.load(partitions[0], map_location="cpu", mmap=True, weights_only=False)[
            "optimizer_state_dict"]:
        state = zero_masters(directory)
    else:
        state = bf16_optimizer_masters(directory, partitions)
    return {name: tensor.float() for name, tensor in state.items()}


def partition_rank(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    assert match is not None, path  # partitions are found by this name
    return int(match.group(1))


def zero_masters(directory: Path) -> dict[str, torch.Tensor]:
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # the merge narrates every file it reads; keep the run's output readable
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)


def stage0_masters(directory: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0: fp32 keeps no separate masters. DeepSpeed's fp16/bf16 optimizers keep them per parameter
    group (a list per group, or one flat tensor per group when fused) but save no names for them at
    stage 0, so the run records its groups' parameter names in the client state."""
    saved = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optimizer = saved.get("optimizer") or {}
    groups = optimizer.get("fp32_groups", optimizer.get("fp32_groups_flat"))
    if groups is None:
        return saved["module"]
    names = json.loads((directory / checkpoint.CLIENT_STATE).read_text()).get("parameter_groups")
    if names is None:
        raise GptError(f"Checkpoint {directory} does not name its optimizer's parameters (it predates "
                       "parameter_groups in client_state.json), so its fp32 weights cannot be consolidated.")
    module = saved["module"]
    masters = {}
    for group_names, group in zip(names, groups, strict=True):
        shapes = {name: module[name].shape for name in group_names}
        tensors = split_flat(group, shapes) if isinstance(group, torch.Tensor) else group
        masters.update({name: tensor.view(shapes[name]) for name, tensor in zip(group_names, tensors, strict=True)})
    return with_shared(masters, saved)


def bf16_optimizer_masters(directory: Path, partitions: list[Path]) -> dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer: per parameter group, rank r holds slice r of one flat fp32 vector
    (the parameters in `param_shapes` order, zero-padded at the end to split evenly)."""
    saved = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    slices = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              ["single_partition_of_fp32_groups"] for path in partitions]
    masters: dict[str, torch.Tensor] = {}
    for index, shapes in enumerate(saved["param_shapes"]):
        flat = torch.cat([rank_slices[index] for rank_slices in slices])
        masters.update(zip(shapes, split_flat(flat, shapes), strict=True))
    return with_shared(masters, saved)


def split_flat(flat: torch.Tensor, shapes: dict) -> list[torch.Tensor]:
    """Consecutive views of `flat` shaped as `shapes` (what follows them is alignment padding)."""
    needed = sum(math.prod(shape) for shape in shapes.values())
    if needed > flat.numel():
        raise GptError(f"The optimizer's fp32 weights ({flat.numel():,} values) do not fit the model's "
                       f"parameters ({needed:,}); the checkpoint is damaged.")
    tensors, offset = [], 0
    for shape in shapes.values():
        count = math.prod(shape)
        tensors.append(flat[offset: offset + count].view(shape))
        offset += count
    return tensors


def with_shared(masters: dict[str, torch.Tensor], saved: dict) -> dict[str, torch.Tensor]:
    """Add the tied parameters DeepSpeed saved once (`shared_params`: alias → source) and the buffers."""
    for alias, source in (saved.get("shared_params") or {}).items():
        if source in masters:
            masters[alias] = masters[source]
    for name in saved.get("buffer_names") or []:
        masters.setdefault(name, saved["module"][name])
    return masters


def consolidate(run_dir: Path, tag: str, config: ModelConfig, tokenizer, out_dir: Optional[Path] = None) -> Path:
    """Write RUN/model (or `out_dir`): the checkpoint's full weights as a model dir."""
    from ...model import model_from_state_dict
    from ...modeldir import save_model_dir

    state = full_state_dict(run_dir, tag)
    for name in ("wte.weight", "lm_head.weight"):
        if name in state and state[name].size(0) > config.padded_vocab_size:
            # Trained with more padding rows than `config` has (a GPT-2 preset on a GPU pads to a multiple
            # of 128); those rows are never looked up or predicted, so dropping them changes nothing.
            state[name] = state[name][: config.padded_vocab_size]
    model = model_from_state_dict(config, state, where=f"Checkpoint {tag}")
    client = json.loads((checkpoint.checkpoints_dir(run_dir) / tag / checkpoint.CLIENT_STATE).read_text())
    metadata = {"step": client["step"], "tokens": client["tokens"], "checkpoint": tag}
    if client.get("init_from"):  # the weights the run started from (train/warmstart.py)
        metadata.update(init_from=client["init_from"]["path"], init_from_sha256=client["init_from"]["sha256"])
    return save_model_dir(out_dir or Path(run_dir) / "model", model, tokenizer, metadata)
