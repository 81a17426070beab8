"""presets.py is the one home of what a preset is: its shape, family, hub id, reference count and published
scores. Whatever asks (inspect-params, the planner, the tasks, load-hf, init_from, the project file's
docs) asks it, so a preset added to the table, or taken out, changes every answer at once."""

from __future__ import annotations

import pytest

from gptcli import planner, presets
from gptcli.config import field_doc, project_from_dict
from gptcli.errors import GptError
from gptcli.presets import PRESETS, Preset, Published, hub_ids, preset_for_shape

WIDE = Preset("gpt2-wide", {**presets._GPT2, "n_layer": 3, "n_head": 4, "n_embd": 256}, 12_345,
              "a test's own reference", "a preset only this test knows", family="gpt2", hub_id="example/gpt2-wide",
              scores={"lambada": {"acc": Published(0.5, "a test's own source")}})


def model(**values):
    return project_from_dict({"model": values}).model


def test_which_preset_has_a_shape_is_answered_by_the_shape_not_the_name():
    assert preset_for_shape(model(preset="gpt2")) == (PRESETS["gpt2"], None)
    assert preset_for_shape(model(n_layer=12, n_head=12, n_embd=768)) == (PRESETS["gpt2"], None)  # no name
    assert preset_for_shape(model(preset="gpt2", n_layer=6)) == (PRESETS["distilgpt2"], "gpt2")  # another's shape
    assert preset_for_shape(model(preset="nano", mlp_ratio=2)) == (None, "nano")
    assert preset_for_shape(model(n_embd=96, n_head=4)) == (None, None)


def test_a_preset_added_to_the_table_is_seen_by_every_part_that_asks(monkeypatch):
    from gptcli.hf import convert
    from gptcli.inspect import inspect_parameters
    from gptcli.tasks import gpt2_shape
    from gptcli.train.state import warmstart

    monkeypatch.setitem(PRESETS, WIDE.name, WIDE)
    config = model(preset=WIDE.name)
    assert planner.model_name(config) == WIDE.name
    report = inspect_parameters(config)
    assert (report.name, report.reference) == (WIDE.name, 12_345)
    assert gpt2_shape(config) == WIDE.name  # its published scores are shown beside its tasks
    project = project_from_dict({"model": {"preset": WIDE.name}})
    assert planner.training_model(project, "cuda").vocab_multiple == planner.plan.GPU_VOCAB_MULTIPLE  # GPT-2 family
    hf_config = {"model_type": "gpt2", "activation_function": "gelu_new", "n_positions": 1024, "vocab_size": 50257,
                 "n_inner": None, "n_layer": 3, "n_head": 4, "n_embd": 256, "layer_norm_epsilon": 1e-5}
    assert convert.model_config_from_hf(hf_config, "gpt2").preset == WIDE.name  # load-hf names it
    assert WIDE.hub_id in hub_ids()
    monkeypatch.setattr(warmstart, "hub_source", lambda name: f"fetched {name}")
    assert warmstart.find_source(WIDE.hub_id) == f"fetched {WIDE.hub_id}"  # train.init_from fetches it


def test_a_preset_taken_out_is_no_longer_fetched_or_padded():
    from gptcli.train.state import warmstart

    project = project_from_dict({"model": {"preset": "distilgpt2"}})
    saved = dict(PRESETS)
    try:
        del PRESETS["distilgpt2"]
        assert "distilgpt2" not in hub_ids()
        with pytest.raises(GptError, match='"distilgpt2" is neither a path that exists nor a model gpt load-hf'):
            warmstart.find_source("distilgpt2")
        assert planner.training_model(project, "cuda").vocab_multiple == 1
        assert preset_for_shape(project.model) == (None, None)
    finally:
        PRESETS.clear()
        PRESETS.update(saved)  # in its order: the docs list the presets as the table does


def test_the_init_from_doc_lists_the_presets_hub_ids():
    assert f"({', '.join(hub_ids())})" in field_doc("train", "init_from")
    assert set(hub_ids()) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "openai-gpt"}


def test_every_preset_says_its_family_and_the_gptcli_sizes_have_no_hub_id_or_scores():
    assert {name: p.family for name, p in PRESETS.items()} == {
        "openai-gpt": "openai-gpt", "gpt2": "gpt2", "gpt2-medium": "gpt2", "gpt2-large": "gpt2", "gpt2-xl": "gpt2",
        "distilgpt2": "gpt2", "tiny": "gptcli", "nano": "gptcli"}
    for name in ("nano", "tiny"):
        assert PRESETS[name].hub_id is None and PRESETS[name].scores == {} and PRESETS[name].reference is None
