"""Training objectives (objectives.py) and gpt eval under them (objective_eval.py): what each counts and
hides, draws that depend on the seed and the window's key alone, their options in the project file, and the
conditional NLL of a splits file against a direct computation, one forward per evaluation token."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcli.config import ConfigError, project_from_dict
from gptcli.objectives import TRAIN_STREAM, keys_for, objective_spec

WINDOWS = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(3))  # (B, N): seq_len 32
KEYS = keys_for(TRAIN_STREAM, 10, 4, 0)


def batch(name: str, options=None, windows=WINDOWS, keys=KEYS):
    return objective_spec(name).batch(windows, keys, 1234, options)


def test_next_token_is_the_shift_of_the_window():
    made = batch("next_token")
    assert torch.equal(made.inputs, WINDOWS[:, :-1]) and torch.equal(made.targets, WINDOWS[:, 1:])
    assert made.model_inputs() == {}


def test_prefix_lm_counts_the_tokens_after_the_drawn_prefix():
    """Slot s predicts token s + 1; it counts when that token lies after the prefix, which is 10%–90% of 32."""
    made = batch("prefix_lm")
    prefix = made.draw["prefix"]
    assert ((prefix >= 4) & (prefix <= 28)).all() and len(set(prefix.tolist())) > 1
    for row in range(4):
        counted = (made.targets[row] != -100).nonzero().flatten() + 1  # the window positions predicted
        assert counted.tolist() == list(range(int(prefix[row]), 33))
        assert torch.equal(made.targets[row, counted - 1], WINDOWS[row, counted])


def test_masked_lm_hides_and_counts_the_same_share_of_each_window():
    made = batch("masked_lm", {"mask_fraction": 0.25})
    assert (made.hidden_tokens.sum(1) == 8).all()  # round(0.25 · 32)
    assert torch.equal(made.targets != -100, made.hidden_tokens)
    assert torch.equal(made.targets[made.hidden_tokens], WINDOWS[:, :-1][made.hidden_tokens])


def test_conditional_splits_each_window_and_queries_each_evaluation_token_in_order():
    """The first n tokens of a window are either conditioned on or evaluated; one query per evaluation token,
    at its position, predicting it, in sequence order; content slots show the tokens at their positions."""
    made = batch("conditional")
    level, content = made.draw["level"], made.draw["content"]
    for row in range(4):
        order = made.order[row]
        n = int((order >= 0).sum())
        conditioned = int((order == 0).sum())
        assert n == 18  # conditional_window(32, 0.25): 18 content slots and at most 14 queries fill 32
        assert math.ceil(0.25 * n) <= conditioned <= round(0.75 * n)
        queries = (~content[row] & (level[row] > 0)).nonzero().flatten()
        evaluated = made.positions[row, queries]
        assert evaluated.tolist() == sorted(evaluated.tolist()) and len(evaluated) == n - conditioned
        assert torch.equal(made.targets[row, queries], WINDOWS[row, evaluated])
        assert (made.targets[row][content[row]] == -100).all()
        shown = content[row].nonzero().flatten()
        assert torch.equal(made.inputs[row, shown], WINDOWS[row, made.positions[row, shown]])


@pytest.mark.parametrize("name", ["prefix_lm", "masked_lm", "conditional"])
def test_a_windows_draw_depends_on_the_seed_and_its_key_alone(name):
    """What makes a resume, or a run on another number of ranks, draw what the first run drew: the same key
    gives the same row whatever else is in the batch; another key or seed, another draw."""
    whole = batch(name)
    alone = objective_spec(name).batch(WINDOWS[2:3], KEYS[2:3], 1234)
    for field in ("inputs", "targets", "positions", "hidden_tokens"):
        if getattr(whole, field) is not None:
            assert torch.equal(getattr(whole, field)[2:3], getattr(alone, field)), field
    other_seed = objective_spec(name).batch(WINDOWS, KEYS, 1235)
    assert not torch.equal(other_seed.targets, whole.targets)


def test_objective_options_are_checked_when_the_project_loads():
    with pytest.raises(ConfigError, match=r'^train.objective_options.mask_fractoin is not an option of the objective '
                                          r'"masked_lm" \(its options: mask_fraction\) \(did you mean "mask_fraction"\?\)\.$'):
        project_from_dict({"train": {"objective": "masked_lm", "objective_options": {"mask_fractoin": 0.2}}})
    with pytest.raises(ConfigError, match=r"train.objective_options.min_condition_fraction \(0.8\) must not exceed "
                                          r"train.objective_options.max_condition_fraction \(0.75\)"):
        project_from_dict({"train": {"objective": "conditional", "objective_options": {"min_condition_fraction": 0.8}}})
    with pytest.raises(ConfigError, match=r'train.objective names "masked", which is not an objective .*did you mean '
                                          r'"masked_lm"'):
        project_from_dict({"train": {"objective": "masked"}})


# --- gpt eval under an objective --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_text(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(corpus.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def model_dir(directory: Path, attention: str) -> Path:
    """A tiny random model with the GPT-2 vocabulary, saved as a model dir."""
    from gptcli.model import build_model
    from gptcli.modeldir import save_model_dir
    from gptcli.tokenizer import load_tokenizer

    config = project_from_dict({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
                                          "attention": attention}}).model
    torch.manual_seed(5)
    return save_model_dir(directory / "model", build_model(config).eval(), load_tokenizer("gpt2"))


def eval_project(objective: str, text: Path, splits: Path, attention: str):
    return project_from_dict({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
                                        "attention": attention},
                              "train": {"objective": objective, "seq_len": 32},
                              "eval": {"text": str(text), "splits": str(splits), "seed": 5, "batch_size": 3}})


def direct_nll(model, tokens: np.ndarray, shown: list[int], target: int, *, conditional: bool,
               condition: set[int]) -> float:
    """-log P(token at `target`) with only `shown` positions visible, in one forward pass of its own: the shown
    tokens at their positions, then a slot that shows no token at the target's position. For a conditional
    model the shown tokens see X_c and the evaluation tokens up to themselves (in the order given), for a masked
    LM everything shown; the last slot sees every shown token."""
    ids = torch.tensor([*tokens[shown].tolist(), 0])[None]
    positions = torch.tensor([*shown, target])[None]
    length = len(shown) + 1
    sees = torch.zeros(length, length, dtype=torch.bool)
    for row, position in enumerate(shown):
        for column, other in enumerate(shown):
            sees[row, column] = (not conditional or other in condition
                                 or (position not in condition and column <= row))
    sees[-1, :] = True
    hidden = torch.zeros(1, length, dtype=torch.bool)
    hidden[0, -1] = True
    if not conditional:  # a masked LM sees the whole window, its other tokens hidden
        ids = torch.tensor(tokens)[None].clone()
        hidden = torch.ones(1, len(tokens), dtype=torch.bool)
        hidden[0, shown] = False
        positions, sees = torch.arange(len(tokens))[None], torch.ones(len(tokens), len(tokens), dtype=torch.bool)
    with torch.no_grad():
        logits, _ = model(ids, position_ids=positions, attention=sees, hidden_tokens=hidden)
    row = -1 if conditional else target
    return -torch.log_softmax(logits[0, row].double(), -1)[int(tokens[target])].item()


@pytest.mark.slow  # a forward pass per evaluation token, with GPT-2's vocabulary
@pytest.mark.parametrize("objective, attention", [("conditional", "conditional"), ("masked_lm", "bidirectional")])
def test_conditional_nll_on_splits_equals_one_forward_per_evaluation_token(objective, attention, tmp_path,
                                                                           scored_text):
    """gpt eval --write-splits then --splits, in process: the loss is the mean over the splits' evaluation
    tokens of -log P(e_i | X_c, e_<i), each computed here by a forward pass that shows only that context
    (fp32, within 1e-5); a masked LM is scored by revealing X_e one token at a time."""
    from gptcli.evaluate import evaluate_project, write_project_splits
    from gptcli.modeldir import load_model_dir
    from gptcli.objective_eval import read_splits

    directory = model_dir(tmp_path, attention)
    project = eval_project(objective, scored_text, tmp_path / "splits.json", attention)
    written = write_project_splits(project, 3)
    assert written["windows"] == 3 and written["window_tokens"] == 18
    result = evaluate_project(project, checkpoint=directory, device="cpu").to_json()
    model = load_model_dir(directory).model
    nats = []
    for tokens, condition, evaluate in read_splits(tmp_path / "splits.json").windows:
        for step, target in enumerate(evaluate.tolist()):
            shown = [*condition.tolist(), *evaluate[:step].tolist()]
            nats.append(direct_nll(model, tokens, shown, target, conditional=objective == "conditional",
                                   condition=set(condition.tolist())))
    assert result["tokens"] == len(nats) == written["evaluate"] and result["objective"] == objective
    assert result["loss"] == pytest.approx(sum(nats) / len(nats), abs=1e-5)


def test_splits_fix_the_sets_whatever_seed_scores_them_and_match_the_seeded_draws(tmp_path, scored_text):
    """Scoring the splits gives the loss of gpt eval under the conditional objective with the splits' seed on
    the same windows (the draws are the same), and another seed given later does not change the splits'."""
    from gptcli.evaluate import evaluate_project, write_project_splits

    directory = model_dir(tmp_path, "conditional")
    splits = tmp_path / "splits.json"
    project = eval_project("conditional", scored_text, splits, "conditional")
    write_project_splits(project, 4)
    on_splits = evaluate_project(project, checkpoint=directory, device="cpu").loss
    reseeded = project_from_dict({**project.to_dict(), "eval": {**project.to_dict()["eval"], "seed": 99}})
    assert evaluate_project(reseeded, checkpoint=directory, device="cpu").loss == on_splits
    first_windows = project_from_dict({**project.to_dict(), "eval": {**project.to_dict()["eval"], "splits": None,
                                                                     "max_tokens": 4 * 33 - 1}})
    assert evaluate_project(first_windows, checkpoint=directory, device="cpu").loss == pytest.approx(on_splits, abs=1e-5)
    assert json.loads(splits.read_text())["format"] == "gptcli-conditional-splits"


def test_a_runs_objective_is_read_from_its_run_dir(tmp_path):
    """gpt eval --checkpoint RUN scores under the objective RUN trained with, unless the project sets one."""
    from gptcli.evaluate import run_objective

    (tmp_path / "model").mkdir()
    (tmp_path / "config.resolved.toml").write_text('[train]\nobjective = "masked_lm"\n'
                                                   "objective_options = { mask_fraction = 0.3 }\n")
    objective, options = run_objective(project_from_dict({}), tmp_path / "model")
    assert objective.name == "masked_lm" and options == {"mask_fraction": 0.3}
    given = project_from_dict({"train": {"objective": "prefix_lm"}})
    assert run_objective(given, tmp_path / "model")[0].name == "prefix_lm"
