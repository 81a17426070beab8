"""Checkpoint bookkeeping on fake checkpoint dirs: manifests and the damage they reveal, which checkpoint
a resume picks, retention, and what --resume never / --restart do to a run dir. Real training runs that
exercise the same paths are in test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptcli import rundir
from gptcli.errors import GptError
from gptcli.fsutil import OWNED_FILES
from gptcli.rundir import CLIENT_STATE, LATEST, MANIFEST, checkpoints_dir
from gptcli.train.state import checkpoint
from gptcli.train.state.checkpoint import (
    agree_on_resume,
    check_checkpoint,
    find_resume,
    prune,
    resume_candidates,
    tag_for,
    write_manifest,
)


def fake_checkpoint(run_dir: Path, step: int, *, manifest: bool = True, latest: bool = True) -> Path:
    """A checkpoint dir with the files a 1-rank ZeRO run saves (small stand-ins), saved the way `save` does."""
    directory = checkpoints_dir(run_dir) / tag_for(step)
    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * 5000)
    (directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 3000 + bytes([step % 256]))
    (directory / "rng_rank0.pt").write_bytes(b"r" * 100)
    (directory / CLIENT_STATE).write_text(json.dumps({"step": step}))
    if manifest:
        write_manifest(directory)
    if latest:
        (checkpoints_dir(run_dir) / LATEST).write_text(tag_for(step) + "\n")
    return directory


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoints_dir(run_dir).glob("step_*"))


# --- manifests ------------------------------------------------------------------------------------------------


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    import hashlib

    directory = fake_checkpoint(tmp_path, 3)
    files = json.loads((directory / MANIFEST).read_text())["files"]
    assert sorted(files) == [CLIENT_STATE, "mp_rank_00_model_states.pt", "rng_rank0.pt",
                             "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    model = (directory / "mp_rank_00_model_states.pt").read_bytes()
    assert files["mp_rank_00_model_states.pt"] == {"bytes": 5000, "sha256": hashlib.sha256(model).hexdigest()}
    assert check_checkpoint(directory) == []


def test_damage_is_named_file_by_file(tmp_path):
    directory = fake_checkpoint(tmp_path, 3)
    with open(directory / "mp_rank_00_model_states.pt", "r+b") as handle:
        handle.truncate(1000)
    (directory / "rng_rank0.pt").unlink()
    assert check_checkpoint(directory) == ["mp_rank_00_model_states.pt has 1000 bytes, 5000 when saved",
                                           "rng_rank0.pt is missing"]


def test_same_size_corruption_is_caught_by_the_hash(tmp_path):
    directory = fake_checkpoint(tmp_path, 3)
    path = directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(b"x" + path.read_bytes()[1:])
    assert check_checkpoint(directory) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt differs from what was saved "
                                           "(sha256)"]


def test_a_checkpoint_saved_before_manifests_is_judged_by_its_client_state(tmp_path):
    directory = fake_checkpoint(tmp_path, 3, manifest=False)
    assert check_checkpoint(directory) == []
    (directory / CLIENT_STATE).unlink()
    assert check_checkpoint(directory) == [f"{CLIENT_STATE} is missing"]


# --- which checkpoint a resume picks ---------------------------------------------------------------------------


def test_resume_falls_back_to_the_newest_intact_checkpoint_with_a_warning(tmp_path, capsys):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (checkpoints_dir(tmp_path) / tag_for(6) / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with open(checkpoints_dir(tmp_path) / tag_for(4) / "mp_rank_00_model_states.pt", "ab") as handle:
        handle.write(b"more")
    assert find_resume(tmp_path, "required") == tag_for(2)
    warnings = capsys.readouterr().err
    assert "checkpoint step_00000006 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt is missing); " \
           "resuming from step_00000002 instead" in " ".join(warnings.split())
    assert "step_00000004 is damaged (mp_rank_00_model_states.pt has 5004 bytes, 5000 when saved)" in warnings


def test_candidates_are_latest_then_older_complete_ones_never_newer_or_unfinished(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, latest=False)
    fake_checkpoint(tmp_path, 8, latest=False)  # finished, but `latest` was never moved to it: a crash
    (checkpoints_dir(tmp_path) / tag_for(3)).mkdir()  # a save that died before its files were all written
    (checkpoints_dir(tmp_path) / LATEST).write_text(tag_for(6) + "\n")
    assert resume_candidates(tmp_path) == [tag_for(6), tag_for(4), tag_for(2)]
    (checkpoints_dir(tmp_path) / LATEST).unlink()  # no `latest`: every complete one, newest first
    assert resume_candidates(tmp_path) == [tag_for(8), tag_for(6), tag_for(4), tag_for(2)]


def test_no_usable_checkpoint_names_every_damaged_file(tmp_path):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
        (checkpoints_dir(tmp_path) / tag_for(step) / "rng_rank0.pt").unlink()
    for mode in ("auto", "required"):  # auto does not quietly start over a run whose checkpoints are all damaged
        with pytest.raises(GptError) as refused:
            find_resume(tmp_path, mode)
        message = str(refused.value)
        assert "No usable checkpoint" in message and "--restart" in message
        assert "step_00000004: rng_rank0.pt is missing; step_00000002: rng_rank0.pt is missing" in message


def test_latest_naming_a_missing_checkpoint_is_damage_not_an_error(tmp_path, capsys):
    fake_checkpoint(tmp_path, 2)
    (checkpoints_dir(tmp_path) / LATEST).write_text(tag_for(9) + "\n")
    assert find_resume(tmp_path, "auto") == tag_for(2)
    assert "step_00000009 is damaged (its directory is missing)" in capsys.readouterr().err


def test_nothing_to_resume(tmp_path):
    assert find_resume(tmp_path, "auto") is None
    with pytest.raises(GptError, match="--resume required, but .* has no complete checkpoint"):
        find_resume(tmp_path, "required")


# --- retention --------------------------------------------------------------------------------------------------


def test_prune_keeps_the_newest_complete_ones_and_removes_partial_newer_ones(tmp_path):
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(tmp_path, step, latest=False)
    fake_checkpoint(tmp_path, 7, manifest=False, latest=False)  # newer than latest: a crashed save
    (checkpoints_dir(tmp_path) / tag_for(7) / CLIENT_STATE).unlink()
    (checkpoints_dir(tmp_path) / tag_for(6)).mkdir()  # newer than latest, nothing finished in it
    prune(checkpoints_dir(tmp_path), keep=2, latest=tag_for(5))
    assert tags(tmp_path) == [tag_for(4), tag_for(5)]


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, latest=False)
    (checkpoints_dir(tmp_path) / tag_for(3) / MANIFEST).unlink()  # damaged, still what latest names
    (checkpoints_dir(tmp_path) / tag_for(3) / CLIENT_STATE).unlink()
    prune(checkpoints_dir(tmp_path), keep=2, latest=tag_for(3))
    assert tags(tmp_path) == [tag_for(1), tag_for(2), tag_for(3)]
    prune(checkpoints_dir(tmp_path), keep=2, latest=tag_for(1))  # a resumed run saved 1 again: 2 and 3 are newer
    assert tags(tmp_path) == [tag_for(1)]


def test_prune_leaves_other_files_alone(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (checkpoints_dir(tmp_path) / "zero_to_fp32.py").write_text("# DeepSpeed's")
    (checkpoints_dir(tmp_path) / "step_notes").mkdir()
    prune(checkpoints_dir(tmp_path), keep=2, latest=tag_for(3))
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [
        LATEST, "step_00000002", "step_00000003", "step_notes", "zero_to_fp32.py"]


# --- --resume never and --restart ------------------------------------------------------------------------------


def a_finished_run(run_dir: Path) -> None:
    """The files a finished run leaves, and a user's own files beside them."""
    for step in (3, 6):
        fake_checkpoint(run_dir, step)
    (checkpoints_dir(run_dir) / "zero_to_fp32.py").write_text("# DeepSpeed's")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 10.0}\n')
    for name in ("metrics.csv", "loss.png", "config.resolved.toml"):
        (run_dir / name).write_text("x")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"tb")
    (run_dir / "model").mkdir()
    for name in ("model.safetensors", "config.json"):
        (run_dir / "model" / name).write_text("w")
    (run_dir / "model" / OWNED_FILES).write_text(json.dumps(["model.safetensors", "config.json"]))
    (run_dir / "NOTES.md").write_text("my notes")
    (checkpoints_dir(run_dir) / "README").write_text("which run this is")
    (run_dir / "tensorboard" / "my-layout.json").write_text("{}")


def test_resume_never_refuses_a_run_dir_that_holds_a_run_and_deletes_nothing(tmp_path):
    a_finished_run(tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(GptError) as refused:
        agree_on_resume(tmp_path, "never", restart=False, rank=0)
    assert "already holds a run" in str(refused.value) and "--restart" in str(refused.value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert agree_on_resume(tmp_path / "fresh", "never", restart=False, rank=0) is None


def test_restart_deletes_only_what_gpt_train_wrote(tmp_path, capsys):
    a_finished_run(tmp_path)
    assert agree_on_resume(tmp_path, "auto", restart=True, rank=0) is None
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["NOTES.md", "checkpoints", "checkpoints/README", "tensorboard", "tensorboard/my-layout.json"]
    note = " ".join(capsys.readouterr().err.split())
    assert "--restart removed what gpt train wrote" in note and "2 checkpoints" in note and "model" in note


def test_restart_refuses_a_model_dir_with_foreign_files_before_deleting_anything(tmp_path):
    a_finished_run(tmp_path)
    (tmp_path / "model" / "my-eval.txt").write_text("keep me")
    with pytest.raises(GptError, match="model holds files gptcli did not write \\(my-eval.txt\\)"):
        agree_on_resume(tmp_path, "auto", restart=True, rank=0)
    assert tags(tmp_path) == [tag_for(3), tag_for(6)] and (tmp_path / "metrics.jsonl").is_file()


def test_restart_with_resume_required_is_a_contradiction(tmp_path):
    a_finished_run(tmp_path)
    with pytest.raises(GptError, match="cannot go with --resume required"):
        agree_on_resume(tmp_path, "required", restart=True, rank=0)
    assert tags(tmp_path) == [tag_for(3), tag_for(6)]


def test_run_files_never_lists_a_users_file(tmp_path):
    a_finished_run(tmp_path)
    listed = {str(p.relative_to(tmp_path)) for p in rundir.run_files(tmp_path)}
    assert listed == {"metrics.jsonl", "metrics.csv", "loss.png", "config.resolved.toml", "model",
                      "checkpoints/latest", "checkpoints/step_00000003", "checkpoints/step_00000006",
                      "checkpoints/zero_to_fp32.py", "tensorboard/events.out.tfevents.1.host.1.0"}


# --- run dirs at the edges: what a run may delete or replace (issue 26) ----------------------------------------


def prepared_data(directory: Path) -> Path:
    """A dir as `gpt prepare` publishes it (its files recorded as prepared data)."""
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text("{}")
    (directory / "train_000000.bin").write_bytes(b"t" * 100)
    (directory / OWNED_FILES).write_text(json.dumps({"what": "prepared data",
                                                     "files": ["manifest.json", "train_000000.bin"]}))
    return directory


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("how", ["inside", "link"])
def test_a_data_dir_at_run_model_is_refused_before_training_and_by_restart(tmp_path, how):
    """data.dir = runs/x/model (or RUN/model a link to the data): the end of the run would replace the
    shards with the model, and --restart delete them; both are refused before anything changes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if how == "inside":
        data = prepared_data(run_dir / "model")
    else:
        data = prepared_data(tmp_path / "data")
        (run_dir / "model").symlink_to(data)
    before = snapshot(tmp_path)
    for restart in (False, True):
        with pytest.raises(GptError) as refused:
            agree_on_resume(run_dir, "auto", restart=restart, rank=0, data_dirs=[data])
        assert ("a data dir of the project" in str(refused.value) or "symbolic link" in str(refused.value))
        assert "internal error" not in str(refused.value) and "--force" not in str(refused.value)
    assert snapshot(tmp_path) == before


def test_prepared_data_at_run_model_is_never_replaced_as_a_model_even_without_the_data_dir(tmp_path):
    run_dir = tmp_path / "run"
    prepared_data(run_dir / "model")
    with pytest.raises(GptError, match="holds prepared data written by gptcli; gptcli replaces only what it wrote as model dir"):
        agree_on_resume(run_dir, "auto", restart=True, rank=0)
    assert (run_dir / "model" / "train_000000.bin").is_file()


def test_a_finished_run_without_its_checkpoints_is_refused_like_an_existing_run(tmp_path):
    """rm -rf RUN/checkpoints, then `gpt train`: it trained from step 1 over model/ and metrics.jsonl."""
    import shutil

    a_finished_run(tmp_path)
    shutil.rmtree(checkpoints_dir(tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(GptError) as refused:
        agree_on_resume(tmp_path, "auto", restart=False, rank=0)
    message = str(refused.value)
    assert "holds a run (model, loss.png) but no checkpoint" in message
    assert "--restart" in message and "project.out_dir" in message
    assert snapshot(tmp_path) == before


def test_metrics_of_a_run_killed_before_its_first_checkpoint_start_over_with_a_note(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 10.0}\n')
    assert agree_on_resume(tmp_path, "auto", restart=False, rank=0) is None
    assert "stopped before its first checkpoint; starting over from step 1" in capsys.readouterr().err


def test_prune_deletes_only_what_the_manifest_lists(tmp_path, capsys):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (checkpoints_dir(tmp_path) / tag_for(1) / "my-notes.txt").write_text("keep me")
    prune(checkpoints_dir(tmp_path), keep=2, latest=tag_for(3))
    assert sorted(p.name for p in (checkpoints_dir(tmp_path) / tag_for(1)).iterdir()) == ["my-notes.txt"]
    assert "holds files gptcli did not write (my-notes.txt)" in capsys.readouterr().err
    assert find_resume(tmp_path, "auto") == tag_for(3)  # the leftover is no checkpoint any more
    assert tags(tmp_path) == [tag_for(1), tag_for(2), tag_for(3)] and resume_candidates(tmp_path)[1:] == [tag_for(2)]


def test_restart_keeps_a_users_file_inside_a_checkpoint(tmp_path, capsys):
    a_finished_run(tmp_path)
    (checkpoints_dir(tmp_path) / tag_for(3) / "eval.txt").write_text("mine")
    agree_on_resume(tmp_path, "auto", restart=True, rank=0)
    assert (checkpoints_dir(tmp_path) / tag_for(3) / "eval.txt").read_text() == "mine"
    assert sorted(p.name for p in (checkpoints_dir(tmp_path) / tag_for(3)).iterdir()) == ["eval.txt"]
    assert "kept files gptcli did not write" in capsys.readouterr().err


def test_restart_with_a_symlinked_model_dir_deletes_nothing(tmp_path):
    """It deleted checkpoints and metrics, then failed on rmtree of the link."""
    a_finished_run(tmp_path)
    (tmp_path / "model").rename(tmp_path / "elsewhere")
    (tmp_path / "model").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    with pytest.raises(GptError, match="model is a symbolic link; gptcli never replaces a link"):
        agree_on_resume(tmp_path, "auto", restart=True, rank=0)
    assert snapshot(tmp_path) == before


def test_a_latest_of_random_bytes_is_one_readable_sentence(tmp_path, capsys):
    import os

    fake_checkpoint(tmp_path, 3)
    (checkpoints_dir(tmp_path) / LATEST).write_bytes(bytes(range(256)) * 12 + os.urandom(100))
    assert find_resume(tmp_path, "auto") == tag_for(3)
    warning = capsys.readouterr().err
    assert "latest (not a checkpoint tag) is damaged" in warning
    assert warning.strip().isprintable() and len(warning) < 300  # no raw bytes, no escape characters
    with pytest.raises(GptError) as refused:
        checkpoint.read_latest(tmp_path)
    assert "does not name a checkpoint (it holds 3,172 bytes" in str(refused.value)
    assert str(refused.value).isprintable() and len(str(refused.value)) < 400


def test_a_foreign_file_in_model_is_refused_at_the_start_without_suggesting_force(tmp_path):
    a_finished_run(tmp_path)
    (tmp_path / "model" / "my-eval.txt").write_text("keep me")
    with pytest.raises(GptError) as refused:
        agree_on_resume(tmp_path, "auto", restart=False, rank=0)
    message = str(refused.value)
    assert "files gptcli did not write (my-eval.txt)" in message and "--force" not in message
