"""`gpt train`'s command (gptcli.train.command): what it suggests next, and that a configuration error stops
it before any rank, launcher or DeepSpeed is started."""

from __future__ import annotations

from pathlib import Path

from conftest import assert_user_error, run_gpt
from gptcli.config import project_from_dict
from gptcli.train.command import TrainRequest, next_commands


def test_next_commands_carry_the_project_and_where_the_run_and_data_are_but_not_training_settings():
    request = TrainRequest(Path("books.toml"), ['data.dir="shards"', "train.max_steps=20",
                                                'project.out_dir="runs/a b"'])
    generate, evaluate = next_commands(request, project_from_dict({"generate": {"prompt": "Once upon"}}))
    assert generate == "gpt generate 'Once upon' --project books.toml '--set=data.dir=\"shards\"' " \
                       "'--set=project.out_dir=\"runs/a b\"'"
    assert evaluate == "gpt eval --project books.toml '--set=data.dir=\"shards\"' '--set=project.out_dir=\"runs/a b\"'"
    assert next_commands(TrainRequest(None, []), project_from_dict({}))[1] == "gpt eval"


def test_a_configuration_error_stops_train_before_anything_starts(tmp_path):
    result = run_gpt("train", "--nproc", "2", "--set", "train.beta1=1.5", cwd=tmp_path)
    assert_user_error(result, "train.beta1 must be in [0, 1), not 1.5")
    assert "loading DeepSpeed" not in result.stderr and list(tmp_path.iterdir()) == []


def test_train_refuses_bidirectional_attention_before_anything_starts(tmp_path):
    """Next-token pretraining with a non-causal pattern would let each position see its own target."""
    result = run_gpt("train", "--nproc", "2", "--set", 'model.attention="bidirectional"', cwd=tmp_path)
    assert_user_error(result, 'model.attention "bidirectional" cannot be pretrained on next-token targets',
                      "each position would see the token it must predict")
    assert result.returncode == 1 and "internal error" not in result.stderr
    assert "loading DeepSpeed" not in result.stderr and list(tmp_path.iterdir()) == []
    # the model and gpt eval keep it: the project itself loads
    assert project_from_dict({"model": {"attention": "bidirectional"}}).model.attention == "bidirectional"
