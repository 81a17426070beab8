"""The leak check (leaks.py): a pattern that lets a prediction see what its objective hides is refused in one
sentence naming the pair, whatever the pattern is called; every built-in objective passes with its own pattern."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptcli.attention import AttentionPattern, attention_pattern, causal_mask, conditional_mask
from gptcli.config import project_from_dict
from gptcli.errors import GptError
from gptcli.leaks import Leak, check_fit, find_leak
from gptcli.objectives import objective_spec

OWN_PATTERN = {"next_token": "causal", "prefix_lm": "prefix", "masked_lm": "bidirectional", "conditional": "conditional"}


def nano(**model):
    return project_from_dict({"model": {"preset": "nano", **model}}).model


def one_pair(context):
    """Causal, and query 20 also sees key 33."""
    return causal_mask(context) | ((context.queries[:, None] == 20) & (context.keys[None, :] == 33))


def test_a_pattern_that_leaks_at_one_pair_is_refused_naming_that_pair(tmp_path):
    """One extra (query, key) pair in a causal mask: the check names it (not the later positions that see it
    through the second layer), in one sentence that says what to change."""
    assert find_leak(objective_spec("next_token"), AttentionPattern("one_pair", "", one_pair), nano(), 64) == Leak(
        query=20, target=21, key=33)
    (tmp_path / "masks.py").write_text("from gptcli.attention import causal_mask\n\n\n"
                                       "def one_pair(context):\n    return causal_mask(context) | ((context.queries[:, "
                                       "None] == 20) & (context.keys[None, :] == 33))\n")
    (tmp_path / "run.toml").write_text('[model]\npreset = "nano"\nattention = "masks.py:one_pair"\n')
    from gptcli.config import load_project

    with pytest.raises(GptError) as refused:
        check_fit(load_project(tmp_path / "run.toml"))
    message = str(refused.value)
    assert message == (f'train.objective "next_token" does not fit model.attention "{tmp_path}/masks.py:one_pair": the '
                       "prediction at position 20 of the token at position 21 depends on the token at position 33, a "
                       "token the objective hides from it; use a pattern in which no query sees what the objective "
                       'hides ("causal" fits next_token), or another objective.')


@pytest.mark.parametrize("objective", list(OWN_PATTERN))
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_each_builtin_objective_passes_with_its_own_pattern(objective, position):
    """With packed documents in the windows (the check sprinkles end-of-text tokens) and its own draws."""
    config = nano(attention=OWN_PATTERN[objective], position=position)
    assert find_leak(objective_spec(objective), attention_pattern(OWN_PATTERN[objective]), config, 64) is None


@pytest.mark.parametrize("objective, pattern, leaks", [
    ("next_token", "bidirectional", True), ("prefix_lm", "causal", False), ("masked_lm", "causal", False),
    ("next_token", "document_sliding_window", False), ("conditional", "causal", True)])
def test_a_pattern_fits_an_objective_by_what_it_hides_not_by_its_name(objective, pattern, leaks):
    """bidirectional is refused for next_token by the check, not by name (position 0 sees its target, token 1);
    a causal pattern is fine for the objectives that hide only later tokens or hidden ones, and leaks for
    conditional's layout, where a query slot comes after the content of the token it predicts."""
    found = find_leak(objective_spec(objective), attention_pattern(pattern), nano(sliding_window=8), 64)
    assert (found is not None) == leaks
    if objective == "next_token" and leaks:
        assert found == Leak(query=0, target=1, key=1)
    elif leaks:
        assert found is not None and found.key == found.target


def test_a_leak_through_a_chain_of_positions_needs_the_models_depth():
    """Conditioning tokens that also see the evaluation tokens: a query sees no hidden token directly, but
    through a conditioning token one layer down. A one-block model shows no leak, the model's two blocks do."""
    def peeking(context):
        content = context.draw["content"]
        return conditional_mask(context) | (content[:, context.queries, None] & content[:, None, context.keys])

    pattern = AttentionPattern("peeking", "", peeking)
    conditional = objective_spec("conditional")
    assert find_leak(conditional, pattern, nano(n_layer=1), 64) is None
    assert find_leak(conditional, pattern, nano(n_layer=2), 64) is not None


def test_the_check_leaves_the_callers_random_state_and_threads_as_they_were():
    """A run seeds its weights after the check: the check must not move torch's generator."""
    torch.manual_seed(11)
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    check_fit(project_from_dict({"model": {"preset": "nano", "attention": "document"}}))
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads


def test_a_pattern_that_needs_an_objectives_draw_names_the_objective():
    project = project_from_dict({"model": {"preset": "nano", "attention": "conditional"}})
    with pytest.raises(GptError, match=r'^The attention pattern "conditional" reads the "level" that train.objective '
                                       r'"conditional" draws for each window'):
        check_fit(project)


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[1] / "examples").glob("objective-*.toml")),
                         ids=lambda path: path.stem)
def test_each_example_project_fits_its_objective(example):
    """docs/attention.md's example projects load and pass the leak check gpt train runs."""
    from gptcli.config import load_project

    project = load_project(example)
    assert project.train.objective in OWN_PATTERN and project.model.attention != "causal"
    check_fit(project)
