"""Sampling: parity with transformers' greedy generate, cache vs no cache, batching, seeds, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_user_error, run_gpt
from gptcli.generate import RowText, SamplingOptions, filter_logits, generate, generate_ids, sample_text
from hf_twin import hf_gpt2, twin_of

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def pair():
    hf = hf_gpt2(seed=0, initializer_range=0.2)  # vocab 500, context 64, 2 layers; varied greedy text
    return hf, twin_of(hf)


@pytest.fixture(scope="module")
def tokenizer():
    from gptcli.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from gptcli.config import ModelConfig
    from gptcli.model import GPT
    from gptcli.modeldir import save_model_dir

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    return save_model_dir(tmp_path_factory.mktemp("gen") / "model", model, tokenizer)


def run(model, prompts, **options):
    with torch.inference_mode():
        return generate_ids(model, prompts, SamplingOptions(**options), eot_id=None)[0]


@pytest.mark.slow
@pytest.mark.parametrize("lookahead", [0, 4])
@pytest.mark.parametrize("prompt", [[5, 17, 42, 99, 3], [7]])
def test_greedy_equals_transformers_generate(pair, prompt, lookahead):
    hf, ours = pair
    ids = torch.tensor([prompt])
    with torch.no_grad():
        reference = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                                do_sample=False, pad_token_id=0)
    ours_ids = run(ours, [prompt], max_new_tokens=40, lookahead=lookahead, **GREEDY)[0]
    assert ours_ids == reference[0, len(prompt):].tolist()


@pytest.mark.slow
def test_lookahead_keeps_the_greedy_output(pair):
    """Prompt-lookup drafts change the speed, not the tokens: past the context, at end-of-text, at a stop."""
    from gptcli.generate import draft_tokens

    assert draft_tokens([1, 2, 3, 4, 2, 3], 4) == [4, 2, 3, 4]  # after the earlier "2 3" came "4"
    assert draft_tokens([5, 5, 5], 3) == [5, 5, 5] and draft_tokens([1, 2, 3], 2) == []
    _, model = pair
    prompt = [9, 8, 7, 9, 8, 7, 9, 8]
    plain = run(model, [prompt], max_new_tokens=150, **GREEDY)[0]  # 158 > 64 positions: slides
    assert run(model, [prompt], max_new_tokens=150, lookahead=6, **GREEDY)[0] == plain
    for eot in (plain[3], plain[-1]):
        options = SamplingOptions(max_new_tokens=150, lookahead=6, **GREEDY)
        with torch.inference_mode():
            ids, reasons = generate_ids(model, [prompt], options, eot_id=eot)
        assert ids[0] == plain[:plain.index(eot)] and reasons == ["eot"]
    with torch.inference_mode():
        stopped = []
        ids, reasons = generate_ids(model, [prompt], SamplingOptions(max_new_tokens=150, lookahead=6, **GREEDY),
                                    on_token=lambda row, token: stopped.append(token) or len(stopped) == 7)
    assert ids[0] == plain[:7] and reasons == ["stop"]


def test_cached_logits_equal_full_forward(pair):
    _, model = pair
    sequence = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(sequence)  # (2, 40, V), no cache
        cache = model.new_kv_cache(2)
        prefill, _ = model(sequence[:, :25], kv_cache=cache)
        steps = [model(sequence[:, t:t + 1], kv_cache=cache)[0] for t in range(25, 40)]
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_left_padded_batch_equals_single_prompts(pair):
    _, model = pair
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]
    batched = run(model, prompts, max_new_tokens=20, **GREEDY)
    assert batched == [run(model, [p], max_new_tokens=20, **GREEDY)[0] for p in prompts]


def test_left_padded_batch_logits_match_single(pair):
    """The padded rows see exactly what they see alone (mask on the key axis, positions from 0)."""
    from gptcli.generate import BatchState, left_pad

    _, model = pair
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    with torch.no_grad():
        tokens, mask = left_pad(prompts, 0, torch.device("cpu"))
        state = BatchState(model, tokens, mask, 4)
        batched = [state.prefill(0)]
        batched.append(state.advance(torch.tensor([9, 9])))
        for row, prompt in enumerate(prompts):
            single, _ = model(torch.tensor([prompt + [9]]))
            torch.testing.assert_close(batched[0][row], single[0, -2], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched[1][row], single[0, -1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_generation_past_the_context_slides(pair):
    """64-token context: 10 + 100 tokens forces two slides; rows of a batch still equal their single runs.

    (Prompts of equal length: with padding the batch slides when its longest row fills the context, so a
    shorter row may then see less context than it would alone; docs/generate-eval.md says so.)"""
    _, model = pair
    prompts = [list(range(1, 11)), list(range(30, 40))]
    batched = run(model, prompts, max_new_tokens=100, **GREEDY)
    assert [len(ids) for ids in batched] == [100, 100]
    assert batched == [run(model, [p], max_new_tokens=100, **GREEDY)[0] for p in prompts]


@pytest.mark.slow
def test_seeds_reproduce_and_differ(pair):
    _, model = pair
    options = dict(max_new_tokens=30, temperature=1.0, top_k=0, num_samples=1)
    torch.manual_seed(123)  # the global RNG must not matter
    first = run(model, [[1, 2, 3]] * 3, seed=7, **options)
    torch.manual_seed(999)
    again = run(model, [[1, 2, 3]] * 3, seed=7, **options)
    other = run(model, [[1, 2, 3]] * 3, seed=8, **options)
    assert first == again
    assert first != other
    assert len({tuple(row) for row in first}) > 1  # the rows of one batch draw different samples


@pytest.mark.slow
def test_top_k_one_equals_greedy(pair):
    _, model = pair
    greedy = run(model, [[5, 6, 7]], max_new_tokens=25, **GREEDY)
    assert run(model, [[5, 6, 7]], max_new_tokens=25, temperature=1.3, top_k=1, seed=3) == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # Nucleus: 0.5 + 0.2 = 0.7 < 0.75, so the third token (0.15) is needed; the fourth is not.
    assert kept(filter_logits(logits, top_p=0.75)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]


def test_top_p_samples_only_from_the_nucleus():
    from gptcli.generate import next_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]])).expand(2000, 4)
    options = SamplingOptions(temperature=1.0, top_k=0, top_p=0.75)
    drawn = next_tokens(logits, options, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.05  # renormalised inside the nucleus


@pytest.mark.slow
def test_end_of_text_stops_a_row(pair):
    _, model = pair
    free = run(model, [[5, 6, 7]], max_new_tokens=10, **GREEDY)[0]
    eot = free[4]
    with torch.inference_mode():
        ids, reasons = generate_ids(model, [[5, 6, 7], [8]], SamplingOptions(max_new_tokens=10, **GREEDY), eot_id=eot)
    assert ids[0] == free[:free.index(eot)] and reasons[0] == "eot"
    with torch.inference_mode():  # the row left in the batch goes on exactly as it would alone
        alone, _ = generate_ids(model, [[8]], SamplingOptions(max_new_tokens=10, **GREEDY), eot_id=eot)
    assert ids[1] == alone[0] and len(ids[1]) > len(ids[0])


def test_stop_string_cuts_the_text(tokenizer):
    row = RowText(tokenizer, ("END",))
    pieces = []
    for token in tokenizer.encode("one two EN"):
        assert not row.add(token)
        pieces.append(row.unshown())
    assert "".join(pieces) == "one two "  # " EN" could still become "END": held back
    assert row.add(tokenizer.encode("D")[0]) and row.text == "one two "


def test_streaming_joins_split_characters(tokenizer):
    row = RowText(tokenizer, ())
    ids = tokenizer.encode("né 🙂 ok")
    shown = []
    for token in ids:
        row.add(token)
        shown.append(row.unshown())
    row.finish()
    shown.append(row.unshown(final=True))
    assert "".join(shown) == "né 🙂 ok" and "\ufffd" not in "".join(shown)


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_generations_head_for_a_few_rows_gives_the_models_logits(vocab_multiple):
    """next_logits puts the weight on the left for 2 to SMALL_HEAD_ROWS rows on a CPU; the logits are the
    model head's (the same products, summed in another order: within 1e-5) over the real vocabulary."""
    from gptcli.config import ModelConfig
    from gptcli.generate import SMALL_HEAD_ROWS, next_logits
    from gptcli.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=500, block_size=16, n_layer=1, n_head=2, n_embd=32,
                            vocab_multiple=vocab_multiple)).eval()
    for rows in range(1, SMALL_HEAD_ROWS + 2):
        hidden = torch.randn(rows, 1, 32)
        logits = next_logits(model, hidden)
        assert logits.shape == (rows, 1, 500)
        torch.testing.assert_close(logits, model.head(hidden), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sample_text_api(model_dir, tokenizer):
    from gptcli.modeldir import load_model_dir

    model = load_model_dir(model_dir).model.train()
    options = SamplingOptions(max_new_tokens=8, seed=1, num_samples=3)
    text = sample_text(model, tokenizer, "In my opinion,", options)
    assert isinstance(text, str) and text
    assert sample_text(model, tokenizer, "In my opinion,", options) == text
    assert model.training  # the caller's mode is restored


def test_long_prompt_is_cropped_with_a_notice(model_dir, tokenizer):
    from gptcli.modeldir import load_model_dir

    model = load_model_dir(model_dir).model
    notices = []
    prompt = "word " * 50  # 51 tokens (the trailing space is one), context 32
    sample, = generate(model, tokenizer, [prompt], SamplingOptions(max_new_tokens=3, **GREEDY),
                       on_notice=notices.append)
    assert sample.cropped_tokens == len(tokenizer.encode(prompt)) - 32 == 19 and sample.prompt_tokens == 32
    assert "last 32 tokens" in notices[0]


def test_a_prompt_ending_in_a_lone_space_token_gets_a_notice(model_dir, tokenizer):
    """GPT-2's BPE makes " the" one token, so "Return the " ends in a token (a lone space) that training text holds
    mostly inside runs of indentation: the notice names the prompt without it. A prompt ending in a word, a
    newline or a space inside a word's token gets none."""
    from gptcli.modeldir import load_model_dir

    model = load_model_dir(model_dir).model
    notices = []
    prompts = ["Return the ", "Return the", "def f():\n", "x = 1\t"]
    generate(model, tokenizer, prompts, SamplingOptions(max_new_tokens=1, **GREEDY), on_notice=notices.append)
    assert [tokenizer.decode([ids[-1]]) for ids in map(tokenizer.encode, prompts)] == [" ", " the", "\n", "\t"]
    assert len(notices) == 2, notices
    assert notices[0].startswith("Prompt 1 ends in a space") and '"Return the" without it' in notices[0]
    assert notices[1].startswith("Prompt 4 ends in whitespace") and '"x = 1" without it' in notices[1]


# --- the command line -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_json_samples(model_dir):
    result = run_gpt("generate", "Hello, I'm a language model,", "In my opinion,", "--checkpoint", model_dir,
                     "-n", "2", "--max-new-tokens", "6", "--seed", "1", "--top-p", "0.95", "--json")
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)["samples"]
    assert [s["prompt"] for s in samples] == ["Hello, I'm a language model,"] * 2 + ["In my opinion,"] * 2
    for sample in samples:
        assert set(sample) >= {"prompt", "text", "tokens"}
        assert len(sample["tokens"]) == 6 or sample["finish_reason"] != "length"
    again = run_gpt("generate", "Hello, I'm a language model,", "In my opinion,", "--checkpoint", model_dir,
                    "-n", "2", "--max-new-tokens", "6", "--seed", "1", "--top-p", "0.95", "--json")
    assert json.loads(again.stdout) == json.loads(result.stdout)


@pytest.mark.slow
def test_cli_stdin_prompt_and_streaming(model_dir):
    greedy = ("--checkpoint", str(model_dir), "--max-new-tokens", "5", "--temperature", "0")
    piped = run_gpt("generate", "-", *greedy, "--json", input="from stdin\n")
    sample, = json.loads(piped.stdout)["samples"]
    assert sample["prompt"] == "from stdin"
    streamed = run_gpt("generate", "from stdin", *greedy)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "from stdin" + sample["text"] + "\n"


@pytest.mark.slow
def test_cli_uses_the_project_run_dir(model_dir, tmp_path):
    import shutil

    shutil.copytree(model_dir, tmp_path / "run" / "model")
    (tmp_path / "run.toml").write_text('[project]\nout_dir = "run"\n[generate]\nmax_new_tokens = 4\n')
    result = run_gpt("generate", "Hi", "--json", "--temperature", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["samples"][0]["tokens"]) == 4
    # Options are overrides of [generate] keys: the option beats --set, which beats the file.
    result = run_gpt("generate", "Hi", "--json", "--temperature", "0", "--set", "generate.max_new_tokens=3",
                     "--max-new-tokens", "5", "--set", "generate.stop=[]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["samples"][0]["tokens"]) == 5
    result = run_gpt("generate", "Hi", "--json", "--temperature", "0", "--set", "generate.max_new_tokens=3",
                     cwd=tmp_path)
    assert len(json.loads(result.stdout)["samples"][0]["tokens"]) == 3


@pytest.mark.slow
def test_cli_bad_input(model_dir, tmp_path):
    assert_user_error(run_gpt("generate", "Hi", "--checkpoint", tmp_path / "missing"), "does not exist")
    assert_user_error(run_gpt("generate", "", "--checkpoint", model_dir), "prompt", "empty")
    assert_user_error(run_gpt("generate", "-", "--checkpoint", model_dir, input="  \n"), "stdin", "empty")
    # Options that stand for [generate] keys are validated by the schema, like the file and --set.
    assert_user_error(run_gpt("generate", "Hi", "--checkpoint", model_dir, "--top-p", "1.5"),
                      "generate.top_p must be in (0, 1], not 1.5")
    assert_user_error(run_gpt("generate", "Hi", "--checkpoint", model_dir, "--temperature", "nan"),
                      "generate.temperature must be a finite number, not nan")
    assert_user_error(run_gpt("generate", "Hi", "--checkpoint", model_dir, "--set", "generate.temperature=nan"),
                      "generate.temperature must be a finite number, not nan")
    twice = run_gpt("generate", "-", "-", "--checkpoint", model_dir, input="x")
    assert twice.returncode == 2 and "at most once" in twice.stderr
    assert_user_error(run_gpt("generate", "Hi", "--checkpoint", tmp_path), "neither a gptcli model dir")


@pytest.mark.gpu
def test_cuda_greedy_matches_cpu(pair):
    _, model = pair
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cpu = run(model, prompts, max_new_tokens=20, **GREEDY)
    cuda_model = twin_of(pair[0]).cuda()
    assert run(cuda_model, prompts, max_new_tokens=20, **GREEDY) == cpu
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert len(run(cuda_model, prompts, max_new_tokens=20, temperature=0.8, seed=1)[0]) == 20


def test_a_top_p_below_float32s_smallest_keeps_the_most_likely_token(pair):
    """`--top-p 1e-300` rounds to 0 in float32, dropped every token and sampled from NaN."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_p=1e-300))[0].tolist() == [True, False, False, False, False]
    _, model = pair
    greedy = run(model, [[5, 6, 7]], max_new_tokens=8, **GREEDY)
    assert run(model, [[5, 6, 7]], max_new_tokens=8, temperature=0.8, top_k=0, top_p=1e-300, seed=1) == greedy


def test_a_temperature_so_small_that_logits_overflow_is_greedy(pair):
    _, model = pair
    greedy = run(model, [[5, 6, 7]], max_new_tokens=8, **GREEDY)
    assert run(model, [[5, 6, 7]], max_new_tokens=8, temperature=1e-300, top_k=0, seed=1) == greedy


def test_more_samples_than_memory_holds_is_one_sentence_before_allocating(model_dir, tokenizer, monkeypatch):
    """`gpt generate hi -n 100000 --max-new-tokens 1` was killed by the kernel at 21 GB, exit 137, no message."""
    from gptcli import machine
    from gptcli.errors import GptError
    from gptcli.modeldir import load_model_dir

    model = load_model_dir(model_dir).model
    monkeypatch.setattr(machine, "available_memory", lambda device="cpu": 2**30)  # 1 GiB free
    generate(model, tokenizer, ["hi"], SamplingOptions(max_new_tokens=1, num_samples=8))  # fits
    with pytest.raises(GptError) as refused:
        generate(model, tokenizer, ["hi"], SamplingOptions(max_new_tokens=1, num_samples=100_000))
    message = str(refused.value)
    assert "Generating 100,000 sample(s)" in message and "more than the 1.0 GiB this machine has free" in message
    assert "--num-samples" in message
