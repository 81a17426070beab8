"""A weighted mixture of prepared dirs (`[[data.sources]]`, data/mixture.py): the schedule's proportions at every
step on 1 and 2 ranks, each source's own order and epochs, an exact resume, a changed mixture refused (or
continued on purpose), pre-flight's table and refusals, and each source measured on its own. All in-process:
none of this reaches DeepSpeed (the training runs are in test_mixture_training.py)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from gptcli.batch import BatchLayout
from gptcli.config import ConfigError, apply_overrides, load_project, project_from_dict
from gptcli.data.mixture import MAX_PERIOD, Schedule, integer_shares
from gptcli.data.source import MixtureSource, open_source
from gptcli.errors import GptError
from shard_fixture import write_shard_dir

FINGERPRINT = "test:mixture"
SEQ_LEN = 16
# Train tokens per source, all different, so that each source's epochs end at their own places: windows of 16
# tokens (+1) → 106, 312, 56, 193, 143 of them.
SIZES = {"a": 1700, "b": 5000, "c": 900, "d": 3100, "e": 2300}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for number, (name, size) in enumerate(SIZES.items()):
        ids = (np.arange(size) * (number + 3)) % 997
        write_shard_dir(root / name, [("train", ids[: size // 2]), ("train", ids[size // 2:]), ("val", np.arange(300))],
                        vocab_size=1000, fingerprint=FINGERPRINT, name="t")
    return root


def mixture(weights: dict[str, float], *overrides: str, root=None) -> str:
    """The --set override of [[data.sources]] for `weights` by source name."""
    tables = ", ".join(f'{{ name = "{name}", dir = "{root / name}", weight = {weight} }}'
                       for name, weight in weights.items())
    return f"data.sources=[{tables}]"


def project(dirs, weights: dict[str, float], *overrides: str):
    return project_from_dict(apply_overrides({"model": {"preset": "nano", "vocab_size": 1000}},
                                             [mixture(weights, root=dirs), f"train.seq_len={SEQ_LEN}", *overrides]))


def global_windows(source, layout: BatchLayout, steps: int, state=None) -> list[list[tuple[str, int]]]:
    """Each optimizer step's windows as (source name, window index), over all ranks in rank order: what the
    run's ranks hand out together."""
    loaders = [source.train_loader(layout, rank, seed=5, shuffle=True) for rank in range(layout.world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint's client state holds it
    out = []
    for _ in range(steps):
        step = []
        for _ in range(layout.grad_accum_steps):
            for loader in loaders:
                names = loader.names
                step += [(names[s], w) for s, w in loader.next_windows()]
        out.append(step)
    return out, loaders[0]


WEIGHTS = [{"a": 0.7, "b": 0.3}, {"a": 5, "c": 1, "d": 2}, {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},
           {"a": 3, "b": 1, "c": 1, "d": 7, "e": 2}]


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "/".join(f"{k}{v}" for k, v in w.items()))
def test_every_source_gives_its_share_within_one_window_at_every_step_on_one_and_two_ranks(dirs, weights):
    source = open_source(project(dirs, weights).data)
    one_rank, _ = global_windows(source, BatchLayout(2, 4, 1, SEQ_LEN), steps=150)  # 8 windows a step
    two_ranks, _ = global_windows(source, BatchLayout(2, 2, 2, SEQ_LEN), steps=150)
    four_ranks, _ = global_windows(source, BatchLayout(1, 2, 4, SEQ_LEN), steps=150)
    assert one_rank == two_ranks == four_ranks  # the same global batches, however ranks and accumulation divide them
    share = np.array(list(weights.values()), dtype=float) / sum(weights.values())
    names = list(weights)
    taken = np.zeros(len(names))
    worst = 0.0
    for step in one_rank:
        for name, _ in step:  # every prefix of the run, window by window, so every step's end too
            taken[names.index(name)] += 1
            worst = max(worst, float(np.abs(taken - share * taken.sum()).max()))
    assert worst <= 1 - 1 / (2 * len(names) - 2) + 1e-9 if len(names) > 2 else worst <= 0.5 + 1e-9
    assert taken.sum() == 150 * 8


def test_each_source_keeps_its_own_shuffled_order_and_epochs(dirs):
    source = open_source(project(dirs, {"a": 2, "c": 1}).data)
    steps, _ = global_windows(source, BatchLayout(4, 1, 1, SEQ_LEN), steps=100)
    given = {"a": [], "c": []}
    for step in steps:
        for name, window in step:
            given[name].append(window)
    for name, windows in given.items():
        count = source.components()[name].windows("train", SEQ_LEN)
        epochs = [windows[start:start + count] for start in range(0, len(windows) - count + 1, count)]
        assert len(epochs) >= 2, name  # of 400 windows a gives 267 (106 a epoch), c 133 (56 an epoch)
        for epoch in epochs:
            assert sorted(epoch) == list(range(count))  # every window once per epoch of its own
        assert epochs[0] != list(range(count)) and (len(epochs) < 2 or epochs[0] != epochs[1])  # shuffled anew
    alone = open_source(project(dirs, {"c": 1, "b": 1}).data)  # c's order is its own: other sources do not move it
    others, _ = global_windows(alone, BatchLayout(4, 1, 1, SEQ_LEN), steps=60)
    assert [w for step in others for name, w in step if name == "c"][:56] == given["c"][:56]


def test_a_resume_on_another_number_of_ranks_hands_out_the_windows_the_run_would_have(dirs):
    source = open_source(project(dirs, {"a": 2, "b": 1, "e": 1}).data)
    whole, _ = global_windows(source, BatchLayout(2, 2, 1, SEQ_LEN), steps=30)
    _, stopped = global_windows(source, BatchLayout(2, 2, 1, SEQ_LEN), steps=11)
    state = stopped.state_dict()
    assert state["taken"] == {"a": 22, "b": 11, "e": 11} and state["position"] == 44
    resumed, _ = global_windows(source, BatchLayout(1, 2, 2, SEQ_LEN), steps=19, state=state)
    assert resumed == whole[11:]


def test_weights_are_normalised_and_kept_exactly_as_written():
    assert integer_shares([0.7, 0.3]) == [7, 3] == integer_shares([7, 3]) == integer_shares([70, 30])
    assert integer_shares([1, 1, 1]) == [1, 1, 1] and integer_shares([0.5, 0.25]) == [2, 1]
    uneven = integer_shares([0.123456789, 0.5, math.pi])  # no ratio of small numbers: parts of MAX_PERIOD
    assert sum(uneven) <= MAX_PERIOD
    assert np.allclose(np.array(uneven) / sum(uneven), np.array([0.123456789, 0.5, math.pi]) / 3.765049442, atol=1e-5)
    assert min(integer_shares([1e-9, 1.0])) == 1  # a tiny weight still gives a window per period
    schedule = Schedule([7, 3])
    assert list(schedule.counts(10)) == [7, 3] and list(schedule.counts(1000)) == [700, 300]


def test_a_changed_mixture_is_refused_in_one_sentence_or_continued_on_purpose(dirs):
    before = open_source(project(dirs, {"a": 0.7, "b": 0.3}).data)
    _, stopped = global_windows(before, BatchLayout(2, 2, 1, SEQ_LEN), steps=10)
    saved = json.loads(json.dumps(stopped.state_dict()))
    assert before.resume_state(saved, 10, SEQ_LEN) == (saved, None)  # the same mixture: as saved
    changed = open_source(project(dirs, {"a": 0.5, "b": 0.3, "c": 0.2}).data)
    with pytest.raises(GptError) as refused:
        changed.resume_state(saved, 10, SEQ_LEN)
    message = str(refused.value)
    assert message.startswith("The checkpoint at step 10 was trained on another mixture (")
    assert '"c" added; weights a 0.700 → 0.500' in message and "data.allow_mixture_change = true" in message
    assert "--restart" in message and message.count(". ") == 0

    allowed = open_source(project(dirs, {"a": 0.5, "b": 0.3, "c": 0.2}, "data.allow_mixture_change=true").data)
    state, note = allowed.resume_state(saved, 10, SEQ_LEN)
    assert "mixture changed at step 10" in note and "RUN/mixture.json" in note
    assert [segment["step"] for segment in state["history"]] == [0, 10]
    assert state["base"] == {"a": 28, "b": 12, "c": 0}
    continued, _ = global_windows(allowed, BatchLayout(2, 2, 1, SEQ_LEN), steps=5, state=state)
    a_next = [w for step in global_windows(before, BatchLayout(2, 2, 1, SEQ_LEN), steps=20)[0] for n, w in step
              if n == "a"][28:]
    assert [w for step in continued for n, w in step if n == "a"] == a_next[:10]  # a goes on where it stood
    c_order = [w for step in global_windows(open_source(project(dirs, {"c": 1}).data), BatchLayout(4, 1, 1, SEQ_LEN),
                                            steps=1)[0] for _, w in step]
    assert [w for step in continued for n, w in step if n == "c"] == c_order[:4]  # c starts its own order


def test_a_one_dir_checkpoint_and_a_mixture_are_not_each_other(dirs):
    one_dir = open_source(project_from_dict({"data": {"dir": str(dirs / "a")}}).data)
    loader = one_dir.train_loader(BatchLayout(2, 1, 1, SEQ_LEN), 0, 5, True)
    loader.next_batch()
    with pytest.raises(GptError, match=r"another mixture \(one data dir, now a mixture\)"):
        open_source(project(dirs, {"a": 1}).data).resume_state(loader.state_dict(), 1, SEQ_LEN)
    _, mixed = global_windows(open_source(project(dirs, {"a": 1, "b": 1}).data), BatchLayout(2, 1, 1, SEQ_LEN), 1)
    with pytest.raises(GptError, match=r"trained on a mixture of a, b, but the project reads one data dir"):
        one_dir.resume_state(mixed.state_dict(), 1, SEQ_LEN)


# --- pre-flight -------------------------------------------------------------------------------------------------


def preflight_text(proj) -> str:
    from gptcli.train import preflight

    stream = io.StringIO()
    preflight.preflight(proj, "cpu", machine=preflight.Machine("cpu", 1, "fp32", cpu_flops=1e11), stream=stream)
    return stream.getvalue()


def test_preflight_prints_a_row_per_source_and_refuses_a_source_repeated_past_max_epochs(dirs):
    run = ("train.micro_batch_size=4", "train.grad_accum_steps=1", "train.max_steps=100", "train.eval_every=0")
    text = preflight_text(project(dirs, {"a": 0.7, "c": 0.3}, *run))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("    ") and line.split()}
    # 400 windows: a 280 of its 106 (2.64 epochs), c 120 of its 56 (2.14 epochs); tokens are windows × 16.
    assert rows["a"][1:] == ["1,700", "0.700", "4,480", "2.64"] and rows["c"][1:] == ["900", "0.300", "1,920", "2.14"]
    assert "a mixture of 2 sources (data.max_epochs = 4)" in text
    longer = project(dirs, {"a": 0.5, "c": 0.5}, *run, "train.max_steps=130")  # c: 260 of 56 windows, a 260 of 106
    with pytest.raises(GptError) as refused:
        preflight_text(longer)
    assert str(refused.value) == (
        f'data.sources "c" ({dirs / "c"}) would be repeated 4.6 times over this run (260 windows of its 56, at weight '
        "0.500), more than data.max_epochs = 4: lower its weight, give it more data, shorten the run, or raise "
        "data.max_epochs.")
    assert "4.64" in preflight_text(project(dirs, {"a": 0.5, "c": 0.5}, *run, "train.max_steps=130",
                                            "data.max_epochs=5"))


def test_preflight_refuses_an_empty_source_and_sources_of_different_tokenizers(dirs, tmp_path):
    write_shard_dir(tmp_path / "tiny", [("train", np.arange(10))], vocab_size=1000, fingerprint=FINGERPRINT, name="t")
    write_shard_dir(tmp_path / "other", [("train", np.arange(500))], vocab_size=1000, fingerprint="test:other",
                    name="t")
    empty = project(dirs, {"a": 1}, 'data.sources=[{name="a", dir="%s"}, {name="tiny", dir="%s"}]'
                    % (dirs / "a", tmp_path / "tiny"))
    with pytest.raises(GptError, match=r'data.sources "tiny" \(.*tiny\) has 10 train tokens: not one sequence of 17 '
                                       r"tokens; prepare more text for it, or leave it out of \[\[data.sources\]\]."):
        preflight_text(empty)
    mixed = project(dirs, {"a": 1}, 'data.sources=[{name="a", dir="%s"}, {name="other", dir="%s"}]'
                    % (dirs / "a", tmp_path / "other"))
    with pytest.raises(GptError, match=r'data.sources "other" \(.*other\) was made with tokenizer test:other but "a" '
                                       r"\(.*\) with test:mixture; prepare every source with the same \[data\] tokenizer."):
        open_source(mixed.data)


# --- the schema ---------------------------------------------------------------------------------------------------


def test_data_sources_tables_are_read_from_the_project_file_and_checked_like_any_key(dirs, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\nmax_epochs = 2\n\n[[data.sources]]\nname = "books"\ndir = "{dirs / "a"}"\nweight = 0.7\n\n'
                    f'[[data.sources]]\nname = "wiki"\ndir = "{dirs / "b"}"\nweight = 0.3\n')
    loaded = load_project(path)
    assert [(s.name, s.weight) for s in loaded.data.sources] == [("books", 0.7), ("wiki", 0.3)]
    assert loaded.data.max_epochs == 2.0 and loaded.data.directories == [str(dirs / "a"), str(dirs / "b")]
    assert isinstance(open_source(loaded.data), MixtureSource)
    wrong = {
        '[{name="a", dir="x", wieght=1}]': 'Unknown key "data.sources[1].wieght" (did you mean "weight"?).',
        '[{name="a", dir="x"}, {name="b"}]': 'data.sources[2] has no "dir" key; every [[data.sources]] table needs one.',
        '[{name="a", dir="x", weight=0}]': "data.sources[1].weight must be more than 0, not 0.0.",
        '[{name="a", dir="x", weight="1"}]': 'data.sources[1].weight must be a number, not "1".',
        '[{name="a/b", dir="x"}]': 'data.sources name "a/b" must start with a letter or digit and hold only letters, '
                                   "digits, _ . - (it names the source's metrics).",
        '[{name="a", dir="x"}, {name="a", dir="y"}]': 'data.sources names "a" twice; each source needs a name of its own.',
        '"books"': 'data.sources must be a list of tables ([[data.sources]]), not "books".',
    }
    for value, message in wrong.items():
        with pytest.raises(ConfigError) as error:
            project_from_dict(apply_overrides({}, [f"data.sources={value}"]))
        assert str(error.value) == message


# --- measured source by source --------------------------------------------------------------------------------------


def test_per_source_eval_losses_weighted_by_their_tokens_are_the_total():
    import torch

    from gptcli.config import ModelConfig
    from gptcli.evaluate import evaluate_parts
    from gptcli.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    tokenizer = type("Tokenizer", (), {"decode_bytes": staticmethod(lambda ids: bytes(len(ids)))})()
    rng = np.random.default_rng(0)
    parts = {"books": [rng.integers(0, 300, 200), rng.integers(0, 300, 45)], "wiki": [rng.integers(0, 150, 130)]}
    result = evaluate_parts(model, tokenizer, parts, source="mixture", stride=16, batch_size=4)
    books, wiki = result.sources["books"], result.sources["wiki"]
    assert books.tokens + wiki.tokens == result.tokens == 199 + 44 + 129
    assert result.loss == pytest.approx((books.loss * books.tokens + wiki.loss * wiki.tokens) / result.tokens, rel=1e-12)
    assert books.loss != pytest.approx(wiki.loss, rel=1e-3)  # wiki's ids are from half the vocabulary: its own loss
    assert set(result.to_json()["sources"]) == {"books", "wiki"}
    rows = eval_table_rows(result)
    assert [row[0] for row in rows] == ["books", "wiki", "total"]
    assert rows[0][1:] == [f"{books.loss:.4f}", f"{books.perplexity:.3f}", f"{books.bits_per_byte:.4f}",
                           f"{books.tokens:,}"] and rows[2][4] == f"{result.tokens:,}"


def eval_table_rows(result) -> list[list[str]]:
    """The rows of `gpt eval`'s by-source table, as the command prints it."""
    from rich.console import Console

    from gptcli import cli

    screen = io.StringIO()
    original = cli.out
    cli.out = Console(file=screen, width=120, color_system=None)
    try:
        cli.show_eval_result(result, as_json=False)
    finally:
        cli.out = original
    text = screen.getvalue()
    table = text[text.index("by source"):].splitlines()
    return [line.replace("│", " ").split() for line in table if line.startswith("│") and "loss" not in line]


def test_metrics_name_each_source_in_the_csv_the_display_and_the_plot():
    from gptcli.train.observing.display import eval_cells
    from gptcli.train.observing.metrics import BASE_COLUMNS, csv_columns, loss_curves

    assert csv_columns((), ["books", "wiki"]) == BASE_COLUMNS + [
        "tokens/books", "tokens/wiki", "eval_loss/books", "eval_loss/wiki", "eval_tokens/books", "eval_tokens/wiki"]
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "eval_loss": 4.5, "eval_loss/books": 4.0,
                                          "eval_loss/wiki": 5.0, "eval_tokens/books": 64, "eval_tokens/wiki": 64}]
    assert [(c.label, c.steps, c.values) for c in loss_curves(records)] == [
        ("train loss", [1, 2], [5.0, 4.0]), ("val loss (token-weighted over the sources)", [2], [4.5]),
        ("val loss, books", [2], [4.0]), ("val loss, wiki", [2], [5.0])]
    assert eval_cells(records[1]) == {"val loss": "4.5000", "val books": "4.0000", "val wiki": "5.0000"}
    assert [c.label for c in loss_curves([{"step": 1, "loss": 5.0, "eval_loss": 5.1}])] == ["train loss", "val loss"]
