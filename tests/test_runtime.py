"""What generate and eval share before they start (gptcli.runtime): the device, and the model to run."""

from __future__ import annotations

import pytest
import torch

from gptcli.config import project_from_dict
from gptcli.errors import GptError
from gptcli.runtime import load_project_model, resolve_device


def test_devices_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GptError, match="unknown device 'gpu0'") as raised:
        resolve_device("gpu0")
    assert raised.value.exit_code == 2  # a usage error, like a bad option


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_where_there_is_none_is_one_sentence():
    with pytest.raises(GptError, match="asks for CUDA, but no CUDA device is available"):
        resolve_device("cuda:1")


def test_without_a_checkpoint_the_projects_run_dir_is_used_and_a_missing_one_is_named(tmp_path):
    project = project_from_dict({"project": {"out_dir": str(tmp_path / "runs" / "never-trained")}})
    with pytest.raises(GptError, match="never-trained does not exist; pass --checkpoint"):
        load_project_model(project, None, torch.device("cpu"))


def test_a_model_dir_given_as_checkpoint_is_loaded(tmp_path):
    from gptcli.model import build_model
    from gptcli.modeldir import save_model_dir
    from gptcli.tokenizer import load_tokenizer

    config = project_from_dict({"model": {"preset": "nano"}}).model
    model = build_model(config)
    save_model_dir(tmp_path / "model", model, load_tokenizer("gpt2"), {"step": 0})
    loaded = load_project_model(project_from_dict({}), tmp_path / "model", torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values(), strict=True))
