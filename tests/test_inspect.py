"""`gpt inspect-params`: counts against references, FLOPs per token, ZeRO memory, no weights allocated."""

from __future__ import annotations

import json

import psutil

from conftest import assert_user_error, run_gpt
from gptcli.config import project_from_dict
from gptcli.inspect import inspect_parameters, zero_memory_per_gpu


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


def test_human_table_shows_total_and_check():
    result = run_gpt("inspect-params", "distilgpt2")
    assert result.returncode == 0
    assert "81,912,576" in result.stdout and "✓" in result.stdout


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
