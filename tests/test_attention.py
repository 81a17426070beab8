"""Attention patterns (attention.py) through the registry: a plugin's pattern is the mask it describes, an
unknown name is refused at load and at forward, and what gpt train and a model dir ask of a pattern."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, gpt_env
from gptcli.attention import CAUSAL, AttentionPattern, attention_pattern
from gptcli.config import ConfigError, project_from_dict
from gptcli.errors import GptError
from gptcli.model import build_model

PLUGINS = REPO / "examples" / "plugins" / "gptcli_example_plugins"


def small(**values):
    torch.manual_seed(0)
    config = project_from_dict({"model": {"vocab_size": 97, "block_size": 32, "n_layer": 2, "n_head": 4,
                                          "n_embd": 32, **values}}).model
    return build_model(config).eval()


def strided(T: int, window: int) -> torch.Tensor:
    """The Sparse Transformer's strided pattern written out: query i sees key j ≤ i when i − j < window or
    i − j is a multiple of window."""
    return torch.tensor([[j <= i and ((i - j) < window or (i - j) % window == 0) for j in range(T)]
                         for i in range(T)])


@pytest.mark.parametrize("how", ["entry point", "file"])
def test_a_plugin_pattern_is_the_mask_it_describes(how, installed_plugins, tmp_path):
    """The example pattern by its installed name and as "file.py:attr": the model's logits equal those of
    the same boolean mask given explicitly (fp32, 1e-6), and differ from causal attention's."""
    if how == "file":
        shutil.copy(PLUGINS / "attention.py", tmp_path)
        project = tmp_path / "run.toml"
        project.write_text('[model]\nattention = "attention.py:PATTERN"\n')
        from gptcli.config import load_project

        name = load_project(project).model.attention  # absolute: read beside the project file
    else:
        name = "example_attention"
    model = small(attention=name, sliding_window=4)
    assert model.pattern.name == "example_attention" and not model.pattern.sees_future
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(idx)
        explicit, _ = model(idx, attention=strided(24, 4))
        causal, _ = model(idx, attention="causal")
    torch.testing.assert_close(logits, explicit, atol=1e-6, rtol=0)
    assert (logits - causal).abs().max() > 1e-3


def test_an_unknown_pattern_is_refused_at_load_and_at_forward():
    with pytest.raises(ConfigError, match=r'model.attention names "sliding", which is not an attention pattern '
                                          r'\(built in: causal, bidirectional, sliding_window.*"sliding_window"\?\)'):
        project_from_dict({"model": {"attention": "sliding"}})
    with pytest.raises(GptError, match=r'attention names "causl", which is not an attention pattern \(built in: '
                                       r'causal, bidirectional, sliding_window.*\(did you mean "causal"\?\)'):
        small()(torch.zeros(1, 4, dtype=torch.long), attention="causl")


def test_a_pattern_object_or_a_module_reference_is_accepted():
    model = small()
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        by_object, _ = model(idx, attention=attention_pattern("bidirectional"))
        by_reference, _ = model(idx, attention="gptcli.attention:BIDIRECTIONAL")
        by_name, _ = model(idx, attention="bidirectional")
    assert torch.equal(by_object, by_name) and torch.equal(by_reference, by_name)


def test_a_pattern_whose_mask_does_not_fit_is_one_sentence():
    wrong = AttentionPattern("wrong", "a float mask", lambda context: context.distance.float())
    with pytest.raises(GptError, match=r'The attention pattern "wrong" returned a torch.float32 tensor of shape '
                                       r"\(5, 5\), not a boolean mask of shape \(T, S\) or \(B, T, S\) with \(T, S\) "
                                       r"= \(5, 5\)\."):
        small()(torch.zeros(1, 5, dtype=torch.long), attention=wrong)
    with pytest.raises(GptError, match=r"model.attention = \"math:pi\" names float .*not an AttentionPattern or a "
                                       r"mask function"):
        attention_pattern("math:pi")


def test_pretraining_refuses_a_pattern_that_leaks_whatever_its_name(tmp_path):
    """check_trainable runs the leak check (leaks.py) on the pattern itself: a renamed bidirectional pattern that
    says it sees no future is refused all the same, naming the pair that leaks."""
    from gptcli.train.command import check_trainable

    (tmp_path / "peek.py").write_text("from gptcli.attention import BIDIRECTIONAL\nimport dataclasses\n"
                                      "PEEK = dataclasses.replace(BIDIRECTIONAL, name='peek', sees_future=False)\n")
    (tmp_path / "run.toml").write_text('[model]\npreset = "nano"\nattention = "peek.py:PEEK"\n')
    from gptcli.config import load_project

    with pytest.raises(GptError, match=r'train.objective "next_token" does not fit model.attention ".*peek.py:PEEK": '
                                       r"the prediction at position 0 of the token at position 1 depends on the token "
                                       r"at position 1, its own target"):
        check_trainable(load_project(tmp_path / "run.toml"))
    check_trainable(project_from_dict({"model": {"preset": "nano", "attention": "sliding_window"}}))


def test_the_builtin_patterns_are_read_without_torch():
    """The schema and gpt train resolve a built-in pattern before anything heavy is imported."""
    code = ("import sys; from gptcli.attention import attention_pattern as p; "
            "print([p(n).sees_future for n in ('causal', 'bidirectional', 'sliding_window')], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=gpt_env())
    assert result.stdout.strip() == "[False, True, False] False", result.stdout
    assert CAUSAL.causal and not attention_pattern("sliding_window").causal


def test_a_model_dir_of_a_pattern_not_installed_here_is_one_sentence(tmp_path):
    from gptcli.modeldir import read_model_config

    config = project_from_dict({"model": {"preset": "nano"}}).model.__dict__ | {"attention": "dilated_lab_pattern"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptError) as error:
        read_model_config(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'config.json'} names what this Python does not have: model.attention "
                              'names "dilated_lab_pattern", which is not an attention pattern (built in: causal')
    assert "\n" not in message and message.endswith(".")
