"""Resuming a checkpoint on another number of ranks.

ZeRO 1-3 save each rank's slice of the fp32 master weights and of the optimizer's state (AdamW's two
moments; stage 3 also of the weights), cut for the number of ranks that saved them. To resume on another number, rank 0 converts the
checkpoint once into DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`: every
parameter's full fp32 master, exp_avg and exp_avg_sq in its own files) and every rank loads it with
`load_universal`, which cuts each rank's new slice out of the full tensors. The values are copied, never
recomputed, so masters and moments come back bit for bit. ZeRO-0 needs no conversion: every rank holds
everything, DeepSpeed loads rank 0's file on any number of ranks.

The conversion is written to CHECKPOINT/universal, built in a staging dir beside it and renamed into
place when complete, with a manifest of its files (sizes, sha256) written before its completion mark, so
a kill mid-conversion leaves the checkpoint as it was (the partial dir is removed and the conversion redone
by the next resume). A complete one is reused while it matches its manifest; a damaged one (a truncated
file) is converted again, with a note: the checkpoint itself is intact. Once the resumed run has saved a
checkpoint of its own, the conversion is no longer needed and is removed (`drop_conversion`); retention and
--restart remove it with its checkpoint. Its cost: see docs/training.md.

The universal format carries Adam's state only (fp32, exp_avg, exp_avg_sq: DeepSpeed 0.19's
ds_to_universal and its loader name these three), so a checkpoint of an optimizer that keeps other state
resumes on the ranks that saved it, and on others is refused in one sentence (`check_reshardable`, from the
spec's state_keys) rather than resumed without its state.

What the universal loader does not carry over as a resume on the same ranks would is set here: each
optimizer group's hyperparameters (DeepSpeed's ZeRO-3 loader gives every group the first group's, weight
decay included), the optimizer's step count as one counter per group (spec.step_key: its ZeRO-3 loader
shares one tensor between them), and the RNG of a rank that did not exist when the checkpoint was saved
(seeded from the project seed, the step and the rank: `new_rank_seed`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...errors import RankAgreedError
from ...fsutil import staging_dir
from ...optimizers import OptimizerSpec
from ...rundir import MANIFEST, UNIVERSAL, checkpoints_dir, step_of_tag
from ...rundir import UNIVERSAL_COMPLETE as COMPLETE
from ..faults import Faults
from .checkpoint import check_checkpoint, write_manifest

# The per-parameter optimizer state DeepSpeed's universal format carries (ds_to_universal, and the
# loader's universal_checkpoint.load_hp_checkpoint_state; DeepSpeed 0.19).
UNIVERSAL_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def check_reshardable(spec: OptimizerSpec, tag: str, saved_ranks: int, ranks: int) -> None:
    """Before converting: an optimizer whose state the universal format does not carry is one sentence (every
    rank decides it alike from the checkpoint: rank 0 alone says it)."""
    missing = [key for key in spec.state_keys if key not in UNIVERSAL_STATE_KEYS]
    if missing:
        raise RankAgreedError(f"Cannot resume checkpoint {tag} on {ranks} rank(s): it was saved on {saved_ranks}, and "
                       f'DeepSpeed\'s universal checkpoint format, which moves optimizer state between numbers of '
                       f'ranks, carries Adam\'s moments only, not the "{spec.name}" optimizer\'s {", ".join(missing)}; '
                       f"resume it on {saved_ranks} rank(s).")


def universal_dir(run_dir: Path, tag: str) -> Path:
    return checkpoints_dir(run_dir) / tag / UNIVERSAL


def ensure_universal(run_dir: Path, tag: str, rank: int) -> Path:
    """Every rank: the universal conversion of checkpoint `tag`, made by rank 0 unless a complete one is
    there; the other ranks wait for it."""
    import deepspeed.comm as dist

    target = universal_dir(run_dir, tag)
    if rank == 0 and not usable(target):
        convert(checkpoints_dir(run_dir) / tag, target, Faults.from_environment(rank))
    dist.barrier()
    return target


def usable(target: Path) -> bool:
    """A complete conversion whose files match its manifest (one made before conversions had a manifest: its
    completion mark). A damaged one is said, and made again."""
    if not (target / COMPLETE).is_file():
        return False
    if not (target / MANIFEST).is_file():
        return True
    problems = check_checkpoint(target)
    if problems:
        print(f"note: the conversion {target} of the checkpoint for another number of ranks is damaged "
              f"({'; '.join(problems[:3])}); the checkpoint itself is intact, so it is converted again.",
              file=sys.stderr)
    return not problems


def drop_conversion(run_dir: Path, tag: str) -> None:
    """Rank 0, once the run resumed from `tag` on other ranks has saved a checkpoint of its own: the conversion
    (as large as the checkpoint's optimizer state) is not needed any more; a resume falls back to `tag` only if
    the new checkpoint is damaged, and then converts again."""
    target = universal_dir(run_dir, tag)
    if target.is_dir() and not target.is_symlink() and (target / COMPLETE).is_file():
        shutil.rmtree(target, ignore_errors=True)


def convert(checkpoint: Path, target: Path, faults: Optional[Faults] = None) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: no child processes to outlive a kill),
    into a staging dir renamed onto `target` once complete."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(target, ignore_errors=True)  # a dir without COMPLETE: never finished
    staging = staging_dir(target, "convert")  # also removes the staging dirs of killed conversions
    output = staging / UNIVERSAL  # ds_to_universal writes a `latest_universal` file beside its output
    try:
        ds_to_universal(argparse.Namespace(input_folder=str(checkpoint), output_folder=str(output),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=True))
        if faults is not None:
            faults.maybe_kill_in_convert(step_of_tag(checkpoint.name))
        write_manifest(output)  # what a later resume checks the conversion against
        (output / COMPLETE).write_text("")
        os.rename(output, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def saved_group_settings(universal: Path) -> list[dict]:
    """The optimizer groups' hyperparameters (lr, betas, eps, weight_decay, ...) as the checkpoint saved
    them, from the conversion's common optimizer state (ZeRO 1-2 keep them at the top, ZeRO-3 nested)."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    return [{key: value for key, value in group.items() if key != "params"} for group in groups]


def restore_optimizer_details(engine, universal: Path, spec: OptimizerSpec) -> None:
    """What DeepSpeed's universal loader gets wrong for us: the groups' hyperparameters (saved_group_settings)
    and, at ZeRO-3, the step count (spec.step_key, AdamW's "step"), which it gives every parameter group as
    one shared tensor, so torch's AdamW, counting in place, would advance it once per group and step (wrong
    bias corrections from the first step on)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's optimizer
    for group, saved in zip(optimizer.param_groups, saved_group_settings(universal), strict=True):
        group.update(saved)
    key = spec.step_key
    for state in optimizer.state.values():
        if key is not None and isinstance(state.get(key), torch.Tensor):
            state[key] = state[key].clone()


def new_rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank the checkpoint has no RNG state for: a function of (seed, step, rank), so two
    resumes of the same checkpoint on the same ranks draw the same dropout."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
