"""A checkpoint's conversion for another number of ranks (CHECKPOINT/universal/): gptcli's own files, checked
against their manifest before reuse, dropped once the resumed run has a checkpoint of its own, deleted with
their checkpoint without a note; and a refusal that every rank reaches alike is said once, by rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptcli import rundir
from gptcli.errors import GptError, RankAgreedError
from gptcli.train.state import checkpoint, reshard


def saved_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint dir as a save leaves it: DeepSpeed's files, the client state, the manifest written last."""
    directory = root / checkpoint.tag_for(step)
    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 200)
    (directory / "client_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    checkpoint.write_manifest(directory)
    return directory


def converted(directory: Path) -> Path:
    """What reshard.convert leaves: DeepSpeed's universal files, their manifest, then the completion mark."""
    universal = directory / rundir.UNIVERSAL
    (universal / "zero" / "wte.weight").mkdir(parents=True)
    for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
        (universal / "zero" / "wte.weight" / name).write_bytes(b"u" * 300)
    (universal / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    checkpoint.write_manifest(universal)
    (universal / rundir.UNIVERSAL_COMPLETE).write_text("")
    return universal


def test_a_truncated_file_in_a_complete_conversion_is_converted_again_with_a_note(tmp_path, capsys):
    """A truncated file inside a complete universal/ was reported as a corrupt checkpoint; the checkpoint is
    intact and the fix is to make the conversion again, which the resume now does itself."""
    universal = converted(saved_checkpoint(tmp_path / "checkpoints", 3))
    assert reshard.usable(universal)
    (universal / "zero" / "wte.weight" / "exp_avg.pt").write_bytes(b"u" * 10)
    assert not reshard.usable(universal)
    said = " ".join(capsys.readouterr().err.split())
    assert "is damaged (zero/wte.weight/exp_avg.pt has 10 bytes, 300 when saved); the checkpoint itself is intact, " \
           "so it is converted again" in said


def test_the_conversion_is_dropped_once_the_resumed_run_saved_its_own(tmp_path):
    """After a resume on another number of ranks, checkpoints/<tag>/universal/ stayed for good (65 MB beside a
    52 MB checkpoint; ~2.5 GB at 124M)."""
    directory = saved_checkpoint(tmp_path / "checkpoints", 3)
    converted(directory)
    reshard.drop_conversion(tmp_path, "step_00000003")
    assert sorted(p.name for p in directory.iterdir()) == [
        "client_state.json", "manifest.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert checkpoint.check_checkpoint(directory) == []


def test_retention_deletes_a_conversion_with_its_checkpoint_without_blaming_the_user(tmp_path, capsys):
    """The note said the dir "holds files gptcli did not write", at every later save."""
    root = tmp_path / "checkpoints"
    first = saved_checkpoint(root, 3)
    converted(first)
    (first / ".universal.convert-4242" / "universal").mkdir(parents=True)  # a killed conversion's staging dir
    (first / ".universal.convert-4242" / "universal" / "part.pt").write_bytes(b"p")
    for step in (6, 9):
        saved_checkpoint(root, step)
    checkpoint.prune(root, keep=2, latest="step_00000009")
    assert not first.exists() and capsys.readouterr().err == ""


def test_a_users_file_inside_a_checkpoint_is_still_kept(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    first = saved_checkpoint(root, 3)
    converted(first)
    (first / "my-notes.txt").write_text("mine")
    for step in (6, 9):
        saved_checkpoint(root, step)
    checkpoint.prune(root, keep=2, latest="step_00000009")
    assert sorted(p.name for p in first.iterdir()) == ["my-notes.txt"]
    assert "holds files gptcli did not write (my-notes.txt)" in capsys.readouterr().err


def test_a_refusal_every_rank_reaches_is_said_by_rank_0_only():
    """A refusal to resume was printed once per rank."""
    from gptcli.train.launching.launch import LAUNCHER_PID_VARIABLE, quiet_exit_code

    refusal = RankAgreedError("No usable checkpoint in RUN/checkpoints ...")
    launched = {LAUNCHER_PID_VARIABLE: "1", "WORLD_SIZE": "2"}
    assert quiet_exit_code(refusal, {**launched, "RANK": "1"}) == 1
    assert quiet_exit_code(refusal, {**launched, "RANK": "0"}) is None  # rank 0 says it
    assert quiet_exit_code(GptError("rank 1's own trouble"), {**launched, "RANK": "1"}) is None  # said where it is


def test_the_resume_decision_and_the_reshard_refusal_are_agreed_errors(tmp_path):
    from gptcli.optimizers import OptimizerSpec

    root = tmp_path / "run" / "checkpoints"
    saved_checkpoint(root, 3)
    (root / "latest").write_text("step_00000003\n")
    (root / "step_00000003" / "client_state.json").write_text("{}")  # damaged: its sha256 differs
    with pytest.raises(RankAgreedError, match="No usable checkpoint"):
        checkpoint.agree_on_resume(tmp_path / "run", "auto", False, 0)
    spec = OptimizerSpec(name="sgd", description="", state_bytes=4, group=None, build=None,
                         state_keys=("momentum_buffer",))
    with pytest.raises(RankAgreedError, match="carries Adam's moments only"):
        reshard.check_reshardable(spec, "step_00000003", 2, 1)
