"""The project file: schema errors name the key, overrides follow the stated precedence, writing round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error, run_gpt
from gptcli.config import (
    ConfigError,
    Project,
    commented_template,
    docs_markdown,
    dump_toml,
    load_project,
    project_from_dict,
)
from gptcli.errors import GptError


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
        ("[train]\nmax_steps = true\n", ["train.max_steps must be an integer, not true"]),
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


# --- values the schema refuses: one sentence naming the key, never an internal error ----------------------


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.lr=nan", ["train.lr must be a finite number, not nan"]),
        ("train.lr=inf", ["train.lr must be a finite number, not inf"]),
        ("train.lr=-0.001", ["train.lr must be more than 0, not -0.001"]),
        ("train.beta1=1.5", ["train.beta1 must be in [0, 1), not 1.5"]),
        ("train.beta2=-0.1", ["train.beta2 must be in [0, 1), not -0.1"]),
        ("train.eps=0", ["train.eps must be more than 0, not 0.0"]),
        ("train.weight_decay=-1", ["train.weight_decay must be 0 or more, not -1.0"]),
        ("train.grad_clip=-1", ["train.grad_clip must be 0 or more, not -1.0"]),
        ("generate.temperature=nan", ["generate.temperature must be a finite number, not nan"]),
        ("generate.top_p=0", ["generate.top_p must be in (0, 1], not 0.0"]),
        ("model.dropout=1", ["model.dropout must be in [0, 1), not 1.0"]),
        ('model.activation="gelu2"', ['model.activation must be one of "gelu", "gelu_new", "relu", "silu", '
                                      'not "gelu2" (did you mean "gelu"?)']),
        ('train.lr_schedule="cosin"', ['train.lr_schedule must be one of "cosine", "linear", "constant"',
                                       'did you mean "cosine"']),
        ("deepspeed.zero_stage=4", ["deepspeed.zero_stage must be one of 0, 1, 2, 3, not 4"]),
        ("deepspeed.zero_stage=true", ["deepspeed.zero_stage must be an integer, not true"]),
        ('eval.split="test"', ['eval.split must be one of "val", "train", not "test"']),
        ("train.seq_len=2048", ["train.seq_len (2048) exceeds model.block_size (1024)"]),
    ],
)
def test_bad_values_through_the_cli_are_one_sentence_naming_the_key(tmp_path, override, fragments):
    result = run_gpt("inspect-params", "--set", override, cwd=tmp_path)
    assert result.returncode == 1
    assert_user_error(result, *fragments)
    assert "internal error" not in result.stderr and result.stdout == ""


def test_a_negative_lr_is_reported_as_lr_not_as_min_lr(tmp_path):
    path = write(tmp_path, "[train]\nlr = -3e-4\n")  # min_lr (6e-5) now exceeds lr as well
    result = run_gpt("inspect-params", "--project", path)
    assert_user_error(result, "train.lr must be more than 0, not -0.0003")
    assert "min_lr" not in result.stderr


def test_train_refuses_a_nan_lr_before_it_starts(tmp_path):
    path = write(tmp_path, "[train]\nlr = nan\n")
    result = run_gpt("train", "--project", path, cwd=tmp_path)
    assert result.returncode == 1
    assert_user_error(result, "train.lr must be a finite number, not nan")
    assert "internal error" not in result.stderr and not (tmp_path / "runs").exists()


def test_cross_section_rules_fail_at_load_naming_both_keys():
    with pytest.raises(ConfigError, match=r"train.seq_len \(65\) exceeds model.block_size \(64\)"):
        project_from_dict({"model": {"preset": "nano"}, "train": {"seq_len": 65}})
    rotary = project_from_dict({"model": {"preset": "nano", "position": "rotary"}, "train": {"seq_len": 128}})
    assert rotary.train.seq_len == 128  # rotary positions extend past block_size
    with pytest.raises(ConfigError, match=r"train.global_batch_tokens \(1,000\) is not a multiple of "
                                          r"train.micro_batch_size × seq_len = 8 × 64"):
        project_from_dict({"model": {"preset": "nano"}, "train": {"global_batch_tokens": 1000}})


def test_sections_built_in_code_are_validated_like_loaded_ones():
    from gptcli.config import GenerateConfig, TrainConfig
    from gptcli.generate import SamplingOptions

    assert SamplingOptions is GenerateConfig  # one schema for the sampler and the [generate] section
    with pytest.raises(ConfigError, match=r"generate.top_p must be in \(0, 1\], not 0"):
        SamplingOptions(top_p=0)
    with pytest.raises(ConfigError, match="train.beta1 must be in"):
        TrainConfig(beta1=1.0)
    assert GenerateConfig(stop=("a",)).stop == ["a"]


def test_field_docs_are_the_help_of_the_options_that_stand_for_them():
    from gptcli.config import field_doc

    assert field_doc("generate", "top_p").startswith("Nucleus sampling")
    result = run_gpt("generate", "--help", env={"COLUMNS": "400"})
    assert field_doc("generate", "top_p") in result.stdout
    assert field_doc("eval", "stride") in run_gpt("eval", "--help", env={"COLUMNS": "400"}).stdout


# --- presets bring training settings that suit their size ---------------------------------------------------


def test_small_presets_bring_cpu_sized_training_below_the_file(tmp_path):
    nano = project_from_dict({"model": {"preset": "nano"}})
    assert (nano.train.lr, nano.train.min_lr, nano.train.max_steps) == (3e-3, 3e-4, 200)
    assert project_from_dict({"model": {"preset": "gpt2"}}).train == Project().train  # GPT-2's own settings
    path = write(tmp_path, '[model]\npreset = "nano"\n[train]\nlr = 1e-3\n')
    project = load_project(path, ["train.max_steps=7"])
    assert project.train.lr == 1e-3  # the file beats the preset
    assert project.train.max_steps == 7  # --set beats both
    assert project.train.min_lr == 3e-4 and project.train.warmup_steps == 20  # the preset beats the defaults


def test_a_seed_beyond_64_bits_is_one_sentence():
    """`--set project.seed=99999999999999999999` overflowed inside torch (internal error)."""
    for key in ("project.seed", "generate.seed"):
        with pytest.raises(ConfigError, match=f"{key} must be in \\[0, 9,223,372,036,854,775,807\\], not 99999999999999999999"):
            load_project(None, [f"{key}=99999999999999999999"])
    assert load_project(None, ["project.seed=9223372036854775807"]).project.seed == 2**63 - 1
