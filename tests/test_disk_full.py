"""A disk that fills (ENOSPC), a file-size limit (`ulimit -f`: EFBIG) or a quota while gptcli writes: one sentence
naming what was being written and what was kept, never "internal error"; nothing half-written is left. (Nothing
was lost before either: `latest` and the old output dirs were kept; only the message was an internal error.)"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gpt_env
from gptcli.errors import GptError
from tiny_models import tiny_model_dir

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def no_space(*args, **kwargs):
    raise NO_SPACE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "model")


def assert_nothing_half_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def test_export_hf_on_a_full_disk_is_one_sentence(tmp_path, model_dir, monkeypatch):
    import safetensors.torch

    from gptcli.hf import export_hf

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(GptError, match=f"Writing {tmp_path / 'hf'} failed: No space left on device; {tmp_path / 'hf'} "
                                       "was not created and the partial files were removed. Free some space"):
        export_hf(model_dir, tmp_path / "hf")
    assert_nothing_half_written(tmp_path, "hf")


@pytest.mark.slow  # load-hf reads the GPT-2 vocabulary files: ~3 s
def test_load_hf_on_a_full_disk_is_one_sentence_and_keeps_the_old_model(tmp_path, model_dir, monkeypatch):
    import safetensors.torch

    from gptcli.hf import export_hf, load_hf

    export_hf(model_dir, tmp_path / "hf")
    shutil.copytree(model_dir, tmp_path / "model")  # a model dir gptcli wrote, which --force may replace
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(GptError, match="No space left on device; .*model was left as it was and the partial files "
                                       "were removed"):
        load_hf(tmp_path / "hf", tmp_path / "model", force=True)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before


def test_prepare_on_a_full_disk_is_one_sentence(tmp_path, monkeypatch):
    from gptcli.config import load_project
    from gptcli.data import prepare as preparing

    text = tmp_path / "book.txt"
    text.write_text("One line of a book.\n" * 200)
    monkeypatch.setattr(preparing, "write_manifest", no_space)
    options = preparing.PrepareOptions.from_project(load_project(None, ["data.workers=1"]), [str(text)],
                                                    tmp_path / "data")
    with pytest.raises(GptError, match=f"Writing {tmp_path / 'data'} failed: No space left on device; "
                                       f"{tmp_path / 'data'} was not created and the partial shards were removed"):
        preparing.prepare(options)
    assert_nothing_half_written(tmp_path, "data")


@pytest.mark.parametrize("error", [
    NO_SPACE, OSError(errno.EFBIG, os.strerror(errno.EFBIG)),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file "
                 "write failed")], ids=["ENOSPC", "EFBIG", "torch.save"])
def test_a_checkpoint_save_on_a_full_disk_names_the_checkpoint_latest_still_names(tmp_path, monkeypatch, error):
    from gptcli.train.state import checkpoint

    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("step_00000003\n")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "save_files", fail)
    with pytest.raises(GptError, match=f"Writing {root / 'step_00000006'} failed: .*; {root / 'latest'} still names "
                                       "step_00000003, which is intact. Free some space"):
        checkpoint.save(None, tmp_path / "run", 6, {}, keep=2)
    other = ValueError("not about room")
    monkeypatch.setattr(checkpoint, "save_files", lambda *args, **kwargs: (_ for _ in ()).throw(other))
    with pytest.raises(ValueError, match="not about room"):  # any other error goes on as it is
        checkpoint.save(None, tmp_path / "run", 6, {}, keep=2)


@pytest.mark.slow
def test_a_real_file_size_limit_is_one_sentence_and_leaves_nothing(tmp_path, model_dir):
    """`ulimit -f` as the issue tried it: the write fails with EFBIG (Python ignores SIGXFSZ)."""
    limit = 64 * 1024  # bytes: the export's weights are larger

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "gptcli", "export-hf", str(model_dir), "--out", str(tmp_path / "hf")],
                            env=gpt_env(), capture_output=True, text=True, preexec_fn=limited, timeout=600)
    assert result.returncode == 1, result.stderr
    said = " ".join(result.stderr.split())
    assert said.startswith(f"error: Writing {tmp_path / 'hf'} failed: File too large;"), said
    assert "internal error" not in said and "Traceback" not in said
    assert_nothing_half_written(tmp_path, "hf")
