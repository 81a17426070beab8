"""The fp32 master weights of a checkpoint as DeepSpeed itself reads them, independently of gptcli's
consolidation, and the check that a run's consolidated model dir holds exactly them."""

from __future__ import annotations

from pathlib import Path

import torch


def deepspeed_fp32_masters(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """deepspeed.utils.zero_to_fp32 for ZeRO partitions (BF16_Optimizer's partitions, which lack the zero_stage
    key that reader wants, are given it in a copy), the optimizer's own fp32 groups at stage 0."""
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gptcli.config import project_from_dict
    from gptcli.model import build_model
    from gptcli.optimizers import ADAMW
    from gptcli.train.engine import parameter_groups

    directory = run_dir / "checkpoints" / tag
    partitions = list(directory.glob("*zero_pp_rank_*_optim_states.pt"))
    if partitions:
        copy = run_dir.parent / f"{run_dir.name}-deepspeed-view" / tag
        shutil.copytree(directory, copy, dirs_exist_ok=True)
        for path in copy.glob("*zero_pp_rank_*_optim_states.pt"):
            saved = torch.load(path, weights_only=False)
            saved["optimizer_state_dict"].setdefault("zero_stage", 1)
            torch.save(saved, path)
        return get_fp32_state_dict_from_zero_checkpoint(str(copy.parent), tag=tag)
    saved = torch.load(directory / "mp_rank_00_model_states.pt", weights_only=False)
    groups = (saved["optimizer"] or {}).get("fp32_groups")
    if groups is None:  # fp32: the module is the master copy
        return saved["module"]
    model = build_model(project_from_dict({"model": {"preset": "nano"}}).model, device="meta")
    name_of = {id(p): n for n, p in model.named_parameters()}
    group_names = [[name_of[id(p)] for p in group["params"]]
                   for group in parameter_groups(model, ADAMW, project_from_dict({}).train)]
    return {name: tensor for names, tensors in zip(group_names, groups, strict=True)
            for name, tensor in zip(names, tensors, strict=True)}


def assert_model_dir_holds_the_masters(run_dir: Path, precision: str) -> None:
    """RUN/model holds the latest checkpoint's fp32 masters bit for bit (torch.equal), not a bf16 copy."""
    from gptcli.modeldir import load_model_dir

    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    masters = deepspeed_fp32_masters(run_dir, tag)
    consolidated = load_model_dir(run_dir).model.state_dict()
    assert set(masters) <= set(consolidated) and "h.1.mlp.c_fc.weight" in masters
    for name, master in masters.items():
        assert master.dtype == torch.float32 and torch.equal(consolidated[name], master), name
    if precision == "bf16":  # not the bf16 module copy: some weights carry bits bf16 cannot hold
        assert not all(torch.equal(t, t.bfloat16().float()) for t in masters.values())
