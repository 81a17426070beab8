"""What tests read from inside a run, through GPTCLI_PROBE_DIR (off, and free, when it is unset):

    windows-rank<R>.jsonl     one line per micro batch this rank's loader hands out, in order, as the
                              data source's loader describes it: for a prepared dir {"epoch": E,
                              "windows": [window indices]}, for a mixture {"sources": [names], "windows":
                              [window indices in each one's split]} (read ahead: a run that stops may list
                              a micro batch or two it never trained on)
    state-<event>-step<N>.pt  rank 0, after the checkpoint of step N is saved (event "saved"), right
                              after it is loaded ("loaded"), or once a fresh run's first weights (a random
                              init, or init_from's) are in the engine ("initialized", step 0): every
                              parameter's full fp32 master and the optimizer's state tensors (its spec's
                              state_keys that the parameter has: AdamW's two moments, a Muon matrix's
                              momentum_buffer; none before the first step), as DeepSpeed's
                              own accessors assemble them, and the spec's step counter

So a test can compare, across a resume on another number of ranks, the windows of every optimizer step
and the optimizer state, without trusting the code that carried them over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from ...optimizers import OptimizerSpec

VARIABLE = "GPTCLI_PROBE_DIR"


def probe_dir() -> Optional[Path]:
    value = os.environ.get(VARIABLE)
    return Path(value) if value else None


def watch_loader(loader, rank: int) -> None:
    """Record what every micro batch `loader` (a data source's) hands out, as its `observe` describes it
    (see the module doc)."""
    directory = probe_dir()
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"windows-rank{rank}.jsonl"

    def record(handed_out: dict) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(handed_out) + "\n")

    loader.observe(record)


def dump_state(engine, spec: "OptimizerSpec", event: str, step: int, rank: int) -> None:
    """Every rank takes part (the full tensors are all-reduced from the ranks' parts); rank 0 writes."""
    directory = probe_dir()
    if directory is None:
        return
    states = full_states(engine, spec)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(states, directory / f"state-{event}-step{step:08d}.pt")


def full_states(engine, spec: "OptimizerSpec") -> dict:
    """{name: {"fp32", *spec.state_keys}} for every parameter (AdamW: "exp_avg", "exp_avg_sq"), and "step":
    the optimizer's step count (spec.step_key; [] for an optimizer that keeps none)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ..state.warmstart import stage0_master_pairs

    link_optimizer_fragments(engine.optimizer)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    stage0 = dict(stage0_master_pairs(engine.optimizer))
    states: dict = {}
    moments = spec.state_keys if inner.state else ()  # an optimizer makes its state at its first step
    for name, param in engine.module.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3, BF16_Optimizer
            states[name] = {"fp32": safe_get_full_fp32_param(param).cpu().clone()}
            for key in moments:
                value = full_optimizer_state(param, key, safe_get_full_optimizer_state)
                if value is not None:
                    states[name][key] = value
        else:  # ZeRO-0: the module's parameter (fp32) or its master, and the optimizer's state of that
            master = stage0.get(id(param), param)
            held = inner.state.get(master, {})
            states[name] = {"fp32": master.detach().float().cpu().clone(),
                            **{key: held[key].cpu().clone() for key in moments if key in held}}
    step_key = spec.step_key
    steps = {float(state[step_key]) for state in inner.state.values() if step_key is not None and step_key in state}
    states["step"] = steps.pop() if len(steps) == 1 else sorted(steps)
    return states


def full_optimizer_state(param, key: str, assemble) -> Optional[torch.Tensor]:
    """The parameter's whole `key` state as DeepSpeed's accessor (`assemble`) puts it together, or None where
    its optimizer keeps no such state for it: a spec of two optimizers keeps each key for its own share
    (Muon's matrices a momentum_buffer, AdamW's rest exp_avg and exp_avg_sq), and DeepSpeed links a
    parameter only to state laid out as its partition (ZeRO 1-2 keep Muon's momentum per whole matrix)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None and key not in mapping.get_optim_state_keys():
        return None
    try:
        return assemble(param, key).cpu().clone()
    except KeyError:  # ZeRO-3: the parameter's sub-group keeps no such state
        return None


def link_optimizer_fragments(optimizer) -> None:
    """DeepSpeed 0.19's ZeRO-1/2 optimizer links each parameter to its slice of the optimizer state after the
    first step for the first parameter group only (it links while the other groups are hidden), so its
    accessors fail for the others; link every group here (what its lazy link does, for all of them)."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    low = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    high = getattr(optimizer, "single_partition_of_fp32_groups", None) or getattr(
        optimizer, "fp32_groups_flat_partition", None)
    state = getattr(getattr(optimizer, "optimizer", None), "state", None)
    if not (low and high and state):
        return
    for params, flat in zip(low, high, strict=True):
        if flat in state:
            lazy_init_hp_params_optimizer_state(params, flat, state)
