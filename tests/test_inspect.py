"""`gpt inspect-params`: counts against references, FLOPs per token, ZeRO memory, no weights allocated."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from conftest import assert_user_error, gpt_env, run_gpt
from gptcli.config import project_from_dict
from gptcli.inspect import inspect_parameters, zero_memory_per_gpu


@pytest.mark.slow
def test_gpt2_json_report_matches_the_contract():
    result = run_gpt("inspect-params", "gpt2", "--gpus", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds one JSON object and nothing else
    assert {"name", "total", "reference", "matches", "components", "flops_per_token", "memory_per_gpu"} <= set(report)
    assert report["total"] == report["reference"] == 124_439_808 and report["matches"] is True
    assert sum(report["components"].values()) == report["total"]
    assert report["components"]["lm_head"] == 0  # tied to wte, counted once
    # 6N + 12·L·H·Q·T with N = all parameters but the 1024·768 position embedding, T = 1024.
    assert report["flops_per_token"] == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024
    N = 124_439_808
    assert report["memory_per_gpu"] == {"zero0": 16 * N, "zero1": 4 * N + 12 * N // 8,
                                        "zero2": 2 * N + 14 * N // 8, "zero3": 16 * N // 8}


@pytest.mark.slow
def test_human_table_shows_total_and_check():
    result = run_gpt("inspect-params", "distilgpt2")
    assert result.returncode == 0
    assert "81,912,576" in result.stdout and "✓" in result.stdout


@pytest.mark.slow
def test_project_model_section_with_set_override(tmp_path):
    project = tmp_path / "run.toml"
    project.write_text('[model]\npreset = "gpt2"\n')
    result = run_gpt("inspect-params", "--project", project, "--set", "model.n_layer=6", "--json")
    report = json.loads(result.stdout)
    assert report["total"] == 124_439_808 - 6 * 7_087_872
    assert report["reference"] is None and report["matches"] is None  # no published count for a custom shape


def test_unknown_preset_is_a_user_error():
    assert_user_error(run_gpt("inspect-params", "gpt5"), 'Unknown preset "gpt5"')


def test_zero_stages_split_the_16_bytes():
    memory = zero_memory_per_gpu(1000, 4)
    assert memory == {"zero0": 16000, "zero1": 4000 + 3000, "zero2": 2000 + 3500, "zero3": 4000}


def test_gpt2_xl_is_inspected_without_allocating_its_weights():
    process = psutil.Process()
    before = process.memory_info().rss
    report = inspect_parameters(project_from_dict({"model": {"preset": "gpt2-xl"}}).model)
    grown = process.memory_info().rss - before
    assert report.total == 1_557_611_200 and report.matches
    assert grown < 200 * 2**20  # fp32 weights alone would be 6.2 GB


def test_the_count_is_the_planners_from_the_configuration_and_no_model_is_built():
    """One parameter count: inspect-params reports planner/counts.py's, so it imports neither the model nor
    torch (tests/test_planner.py holds that count to the modules the model builds)."""
    from gptcli import planner
    from source_tree import PACKAGE, imports_of

    imported = imports_of(PACKAGE / "inspect.py")
    assert not [name for name in imported if name.startswith(("gptcli.model", "torch"))], sorted(imported)
    config = project_from_dict({"model": {"preset": "gpt2", "vocab_multiple": 128, "tie_embeddings": False}}).model
    report = inspect_parameters(config)
    assert report.components == planner.parameter_components(config) and report.total == sum(report.components.values())


@pytest.mark.slow
def test_a_customised_preset_is_not_reported_as_that_preset(tmp_path):
    """mlp_ratio is not among the keys the gpt2 preset lists, yet changing it changes the shape."""
    project = tmp_path / "run.toml"
    project.write_text('[model]\npreset = "gpt2"\n')
    for args in (("--project", project), ("gpt2",)):
        result = run_gpt("inspect-params", *args, "--set", "model.mlp_ratio=2", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["total"] == 124_439_808 - 12 * (4 * 768 * 768 + 2 * 768)  # half the MLP: weights, c_fc bias
        assert report["reference"] is None and report["matches"] is None
        assert report["customised_from"] == "gpt2" and report["name"] != "gpt2"
        human = run_gpt("inspect-params", *args, "--set", "model.mlp_ratio=2")
        assert "✗" not in human.stdout and "124,439,808" not in human.stdout
        assert "customised: no published count" in " ".join(human.stdout.split())


@pytest.mark.slow
def test_a_preset_name_in_a_file_with_another_shape_is_not_named(tmp_path):
    project = tmp_path / "run.toml"
    project.write_text('[model]\npreset = "nano"\nn_layer = 12\nn_embd = 768\nn_head = 12\nblock_size = 1024\n')
    report = json.loads(run_gpt("inspect-params", "--project", project, "--json").stdout)
    assert report["name"] == "custom" and report["customised_from"] == "nano"


@pytest.mark.slow
def test_without_argument_or_project_every_preset_side_by_side(tmp_path):
    from gptcli.presets import PRESETS

    result = run_gpt("inspect-params", "--json", cwd=tmp_path)  # no run.toml here
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)["presets"]
    assert [r["name"] for r in reports] == list(PRESETS)
    by_name = {r["name"]: r for r in reports}
    assert by_name["gpt2-xl"]["total"] == 1_557_611_200 and by_name["gpt2-xl"]["matches"] is True
    assert by_name["nano"]["reference"] is None and by_name["nano"]["total"] == 3_320_640
    human = run_gpt("inspect-params", cwd=tmp_path, env={"COLUMNS": "250"})
    for name in PRESETS:
        assert name in human.stdout
    assert human.stdout.count("✓") == 6 and "✗" not in human.stdout
    (tmp_path / "run.toml").write_text('[model]\npreset = "distilgpt2"\n')  # a project: its model, as before
    assert json.loads(run_gpt("inspect-params", "--json", cwd=tmp_path).stdout)["name"] == "distilgpt2"


def test_list_describes_each_preset_and_its_training_settings():
    from gptcli.presets import PRESETS

    listed = json.loads(run_gpt("inspect-params", "--list", "--json").stdout)
    assert list(listed) == list(PRESETS)
    assert listed["nano"]["train"]["lr"] == 3e-3 and listed["gpt2"]["train"] == {}
    assert "seconds" not in listed["nano"]["description"]


@pytest.mark.slow
def test_inspecting_leaves_torch_init_alone_and_skips_the_dynamo_import():
    """Start-up: building a meta model must not pull in torch._dynamo (about a second) through the init
    functions' meta kernels, and must give torch.nn.init back as it found it."""
    probe = ("import sys, torch, torch.nn.init as init\n"
             "before = init.normal_\n"
             "from gptcli.config import project_from_dict\n"
             "from gptcli.inspect import inspect_parameters\n"
             "report = inspect_parameters(project_from_dict({'model': {'preset': 'gpt2-xl'}}).model)\n"
             "assert report.matches, report.total\n"
             "assert init.normal_ is before\n"
             "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=gpt_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
