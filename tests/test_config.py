"""The project file: schema errors name the key, overrides follow the stated precedence, writing round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error, run_gpt
from gptcli.errors import GptError
from gptcli.config import (ConfigError, Project, commented_template, docs_markdown, dump_toml, load_project,
                           project_from_dict)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./run.toml here
    project = load_project()
    assert project == Project()
    assert project.model.n_layer == 12 and project.train.max_steps == 1000


def test_run_toml_in_the_working_directory_is_the_default(tmp_path, monkeypatch):
    write(tmp_path, "[train]\nmax_steps = 7\n")
    monkeypatch.chdir(tmp_path)
    assert load_project().train.max_steps == 7


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("[model]\nn_layr = 3\n", ['Unknown key "model.n_layr"', 'did you mean "n_layer"']),
        ("[trian]\nmax_steps = 3\n", ['Unknown section "[trian]"', 'did you mean "train"']),
        ("[model.rotary]\nbase = 3\n", ['"model.rotary"', 'Unknown key']),
        ("[train.lr]\nvalue = 3\n", ['"train.lr" is a table', "must be a number"]),
        ("[deepspeed]\nzero_stage = \"two\"\n", ['deepspeed.zero_stage must be an integer, not "two"']),
        ("[model]\nbias = 1\n", ["model.bias must be true or false, not 1"]),
        ("[train]\nmax_steps = true\n", ["train.max_steps must be an integer, not True"]),
        ("[model]\nn_embd = 100\nn_head = 3\n", ["model.n_embd (100) must be divisible by model.n_head (3)"]),
        ("[train]\nlr = 1e-4\nmin_lr = 1e-3\n", ["train.min_lr (0.001) must not exceed train.lr (0.0001)"]),
        ("[model]\npreset = \"gpt3\"\n", ['Unknown preset "gpt3"']),
        ("[model\n", ["is not valid TOML"]),
    ],
)
def test_bad_project_files_name_the_key(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(GptError) as caught:
        load_project(path)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_bad_project_file_through_the_cli_is_one_sentence(tmp_path):
    path = write(tmp_path, "[model]\nn_layr = 3\n")
    result = run_gpt("inspect-params", "--project", path)
    assert result.returncode == 1
    assert_user_error(result, 'Unknown key "model.n_layr"', 'did you mean "n_layer"')
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) <= 2  # one sentence, possibly wrapped once


def test_missing_project_file(tmp_path):
    assert_user_error(run_gpt("inspect-params", "--project", tmp_path / "nope.toml"), "does not exist")


def test_precedence_cli_over_file_over_preset_over_defaults(tmp_path):
    path = write(tmp_path, '[model]\npreset = "gpt2-medium"\nn_layer = 3\n[train]\nlr = 0.001\n')
    project = load_project(path, ["model.n_head=8", "train.max_steps=5", "project.name=demo run"])
    assert project.model.n_head == 8  # --set beats the preset
    assert project.model.n_layer == 3  # the file beats the preset
    assert project.model.n_embd == 1024  # the preset beats the defaults
    assert project.train.lr == 0.001 and project.train.max_steps == 5
    assert project.project.name == "demo run"  # a bare word is read as a string
    assert project.train.eval_every == 100  # untouched default


def test_override_of_an_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match='Unknown key "train.max_step".*"max_steps"'):
        load_project(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_project(None, ["max_steps=3"])


def test_ints_are_accepted_as_floats_but_not_bools_as_ints():
    assert project_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError):
        project_from_dict({"train": {"micro_batch_size": True}})


def test_resolved_dump_round_trips(tmp_path):
    original = project_from_dict({"model": {"preset": "nano"}, "deepspeed": {"config": {"wall_clock_breakdown": True}},
                                  "generate": {"stop": ["\n\n"], "seed": 3}})
    path = write(tmp_path, dump_toml(original))
    assert load_project(path) == original


def test_init_template_holds_every_key_with_its_default(tmp_path):
    path = write(tmp_path, commented_template())
    assert load_project(path) == Project()
    text = path.read_text()
    for section in dataclasses.fields(Project):
        if section.metadata.get("internal"):
            continue
        for f in dataclasses.fields(getattr(Project(), section.name)):
            assert f"{f.name} = " in text, f.name
            assert f"# {f.metadata['doc']}" in text


def test_init_template_with_a_preset(tmp_path):
    project = load_project(write(tmp_path, commented_template("distilgpt2")))
    assert project.model.preset == "distilgpt2" and project.model.n_layer == 6


def test_docs_page_is_current():
    page = REPO / "docs" / "project-file.md"
    assert page.read_text() == docs_markdown(), "regenerate with: python -m gptcli.config > docs/project-file.md"


def test_architecture_fingerprint_ignores_training_only_keys():
    a = project_from_dict({"model": {"preset": "nano"}}).model
    b = project_from_dict({"model": {"preset": "nano", "dropout": 0.1}}).model
    c = project_from_dict({"model": {"preset": "nano", "n_layer": 3}}).model
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_null_optional_keys_read_as_unset():
    """Model dirs store the [model] section as JSON, where an unset preset is null."""
    assert project_from_dict({"model": {"preset": None, "n_layer": 2}}).model.preset is None
    with pytest.raises(ConfigError, match="model.n_layer must be an integer, not None"):
        project_from_dict({"model": {"n_layer": None}})
