"""`[train] init_from`: the weights a run starts from pass the checks load-hf, eval and export-hf make
(floating point, finite), and they must outlive the run (never inside its own out_dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptcli.errors import GptError
from tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("source") / "model")


def damaged_copy(model_dir: Path, directory: Path, damage) -> Path:
    """A copy of `model_dir` whose weights `damage(tensors)` changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = directory / "damaged"
    shutil.copytree(model_dir, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    damage(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    return copy


def integer_weights(tensors) -> None:
    for name in list(tensors):
        tensors[name] = (tensors[name] * 100).long()


def a_nan(tensors) -> None:
    tensors["h.0.mlp.c_fc.weight"][1, 2] = float("nan")


@pytest.mark.parametrize("damage, fragment", [
    (integer_weights, "is int64, not floating point"),
    (a_nan, "h.0.mlp.c_fc.weight holds 1 NaN or infinite values"),
], ids=["integer", "nan"])
def test_init_from_weights_that_load_hf_refuses_are_refused_before_training(tmp_path, model_dir, damage, fragment):
    """Integer weights trained a dead model (loss 10.8249 every step, grad norm 0, exit 0); NaN weights failed
    only at the first loss. load-hf refused both; init_from reads them through the same check now."""
    from gptcli.train.state.warmstart import find_source, read_weights

    source = find_source(str(damaged_copy(model_dir, tmp_path, damage)))
    with pytest.raises(GptError, match=f"train.init_from .*model.safetensors\\): .*{fragment}"):
        read_weights(source)


@pytest.mark.parametrize("damage", [integer_weights, a_nan], ids=["integer", "nan"])
def test_eval_and_generate_refuse_them_too(tmp_path, model_dir, damage):
    from gptcli.modeldir import load_model_dir

    with pytest.raises(GptError, match="model.safetensors: .*(not floating point|NaN or infinite)"):
        load_model_dir(damaged_copy(model_dir, tmp_path, damage))


def test_good_weights_still_load(model_dir):
    from gptcli.train.state.warmstart import find_source, read_weights

    state = read_weights(find_source(str(model_dir)))
    assert state["wte.weight"].dtype.is_floating_point and "lm_head.weight" not in state


@pytest.mark.parametrize("where", ["model", ".", "model/../model"])
def test_init_from_inside_the_runs_own_out_dir_is_refused(tmp_path, model_dir, where):
    """`init_from = RUN/model` with --restart: the source was read, deleted, replaced by the new model, and
    config.resolved.toml kept its old sha256 for a path holding other weights."""
    import shutil

    from gptcli.config import load_project
    from gptcli.train.state.continuation import prepare

    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "model")
    init_from = str(run_dir / where)
    project = load_project(None, [f'project.out_dir="{run_dir}"', f'train.init_from="{init_from}"'])
    for resume in ("never", "auto"):  # --restart starts fresh: "never"
        with pytest.raises(GptError, match=f'train.init_from "{init_from}" lies inside the run dir {run_dir} '
                                           r"\(project.out_dir\), which the run replaces"):
            prepare(project, resume, 1)
    assert (run_dir / "model" / "model.safetensors").is_file()  # nothing deleted
