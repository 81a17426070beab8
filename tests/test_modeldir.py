"""Model dirs: save and load give back the same model (tied head shared again), faults are named, and
replacing a dir never deletes what gptcli did not write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from conftest import gpt_env
from gptcli.config import project_from_dict
from gptcli.errors import GptError
from gptcli.fsutil import OWNED_FILES
from gptcli.model import build_model, model_from_state_dict
from gptcli.modeldir import WEIGHTS_FILE, load_model_dir, save_model_dir, state_dict_for_saving
from gptcli.tokenizer import load_tokenizer

TINY = {"preset": "nano", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


def tiny_model(seed: int = 0, **overrides):
    config = project_from_dict({"model": {**TINY, **overrides}}).model
    torch.manual_seed(seed)
    return build_model(config)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


def test_round_trip_gives_the_same_logits_and_a_shared_head(tmp_path, tokenizer):
    model = tiny_model().eval()
    save_model_dir(tmp_path / "model", model, tokenizer, metadata={"step": 7})
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.model.lm_head.weight is loaded.model.wte.weight  # tied again, not two copies
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint and not loaded.model.training
    batch = torch.tensor([tokenizer.encode("To be, or not to be: that is the question.")])
    with torch.no_grad():
        assert torch.equal(loaded.model(batch)[0], model(batch)[0])
    assert loaded.config == model.config


def test_untied_head_round_trip(tmp_path, tokenizer):
    model = tiny_model(tie_embeddings=False)
    save_model_dir(tmp_path / "model", model, tokenizer)
    loaded = load_model_dir(tmp_path / "model").model
    assert loaded.lm_head.weight is not loaded.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_model_dirs_follow_the_umask(tmp_path, tokenizer):
    previous = os.umask(0o022)
    try:
        save_model_dir(tmp_path / "model", tiny_model(), tokenizer)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_replacing_a_model_dir_keeps_only_the_new_files(tmp_path, tokenizer):
    save_model_dir(tmp_path / "model", tiny_model(seed=1), tokenizer)
    second = tiny_model(seed=2)
    save_model_dir(tmp_path / "model", second, tokenizer)
    assert torch.equal(load_model_dir(tmp_path / "model").model.wte.weight, second.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old dir left


def test_a_model_dir_from_before_the_file_list_stays_replaceable(tmp_path, tokenizer):
    save_model_dir(tmp_path / "model", tiny_model(seed=1), tokenizer)
    (tmp_path / "model" / OWNED_FILES).unlink()
    save_model_dir(tmp_path / "model", tiny_model(seed=2), tokenizer)
    assert (tmp_path / "model" / OWNED_FILES).is_file()


@pytest.mark.parametrize("intruder, fragment", [
    ("notes.txt", "files gptcli did not write (notes.txt)"),
    (".git", "is a git repository (it holds .git)"),
])
def test_foreign_files_are_never_replaced(tmp_path, tokenizer, intruder, fragment):
    save_model_dir(tmp_path / "model", tiny_model(), tokenizer)
    (tmp_path / "model" / intruder).mkdir() if intruder == ".git" else (tmp_path / "model" / intruder).write_text("x")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    with pytest.raises(GptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        save_model_dir(tmp_path / "model", tiny_model(seed=5), tokenizer)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before


def test_a_dir_that_is_no_model_dir_is_not_replaced(tmp_path, tokenizer):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(GptError, match="holds no record of files written by gptcli"):
        save_model_dir(tmp_path / "model", tiny_model(), tokenizer)
    (tmp_path / "file").write_text("x")
    with pytest.raises(GptError, match="is a file, not a directory"):
        save_model_dir(tmp_path / "file", tiny_model(), tokenizer)


def test_stale_staging_dir_of_a_killed_save_is_removed(tmp_path, tokenizer):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    stale = tmp_path / f".model.model-{process.pid}"
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"\0" * 1000)
    save_model_dir(tmp_path / "model", tiny_model(), tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_truncated_weights_are_one_sentence(tmp_path, tokenizer):
    save_model_dir(tmp_path / "model", tiny_model(), tokenizer)
    weights = tmp_path / "model" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GptError, match=f"Cannot read {weights}"):
        load_model_dir(tmp_path / "model")


# --- model_from_state_dict ------------------------------------------------------------------------------------


def test_every_tensor_comes_from_the_state_on_the_asked_device_and_dtype():
    model = tiny_model(seed=3)
    state = state_dict_for_saving(model)  # no lm_head: tied
    built = model_from_state_dict(model.config, state, dtype=torch.bfloat16)
    assert built.lm_head.weight is built.wte.weight
    for name, tensor in built.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
        assert torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16)), name


def test_missing_unexpected_and_wrong_shapes_are_named():
    model = tiny_model()
    state = state_dict_for_saving(model)
    del state["h.0.attn.c_attn.bias"]
    state["h.9.mlp.c_fc.weight"] = torch.zeros(1)
    state["h.1.ln_1.weight"] = torch.zeros(31)
    with pytest.raises(GptError) as error:
        model_from_state_dict(model.config, state, where="Checkpoint step_5")
    message = str(error.value)
    assert message.startswith("Checkpoint step_5 does not fit the model config")
    assert "missing: h.0.attn.c_attn.bias" in message and "unexpected: h.9.mlp.c_fc.weight" in message
    assert "wrong shape: h.1.ln_1.weight [31] (expected [32])" in message


def test_a_tied_head_must_equal_the_embedding():
    model = tiny_model()
    state = dict(model.state_dict())  # holds lm_head.weight, the same tensor as wte.weight: fine
    built = model_from_state_dict(model.config, state)
    assert built.lm_head.weight is built.wte.weight and torch.equal(built.wte.weight, model.wte.weight)
    state["lm_head.weight"] = state["wte.weight"] + 1
    with pytest.raises(GptError, match="lm_head.weight that differs from wte.weight"):
        model_from_state_dict(model.config, state)


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_loading_a_model_dir_runs_no_init_function_and_imports_no_dynamo(tmp_path):
    """The meta model that weights are assigned into is built without the init functions (their meta
    kernels import torch._dynamo, about a second of every gpt generate / gpt eval start), and the model
    dir's GPT-2 vocabulary gets its known fingerprint without hashing the ranks again."""
    model = tiny_model()
    save_model_dir(tmp_path / "model", model, load_tokenizer("gpt2"))
    code = ("import sys, torch.nn.init as init\n"
            "from gptcli.modeldir import load_model_dir\n"
            "calls = []\n"
            "for name in ('normal_', 'uniform_', 'kaiming_uniform_', 'ones_', 'zeros_'):\n"
            "    setattr(init, name, (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(getattr(init, name)))\n"
            f"loaded = load_model_dir({str(tmp_path / 'model')!r})\n"
            "print(len(calls), 'torch._dynamo' in sys.modules, loaded.tokenizer.fingerprint)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=gpt_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False", load_tokenizer("gpt2").fingerprint]
    assert torch.equal(load_model_dir(tmp_path / "model").model.wte.weight, model.wte.weight)
