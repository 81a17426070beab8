"""The model: exact parameter counts, the initial loss, masks, GPT-1 vs GPT-2 layer order, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import module_parameter_components, module_parameter_count
from gptcli.config import ModelConfig, project_from_dict
from gptcli.model import build_model
from gptcli.presets import PRESETS


def model_config(**values) -> ModelConfig:
    return project_from_dict({"model": values}).model


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.reference is not None])
def test_every_preset_has_its_reference_count(name):
    model = build_model(model_config(preset=name), device="meta")
    assert module_parameter_count(model) == PRESETS[name].reference


def expected_count(V, P, L, C, ratio=4, bias=True, tied=True, final_norm=True, learned=True):
    """The count written out by hand: embeddings, then per block attention + MLP + two LayerNorms."""
    b = 1 if bias else 0
    attention = C * 3 * C + b * 3 * C + C * C + b * C
    mlp = C * ratio * C + b * ratio * C + ratio * C * C + b * C
    norms = 2 * (C + b * C)
    total = V * C + (P * C if learned else 0) + L * (attention + mlp + norms)
    total += (C + b * C) if final_norm else 0
    return total + (0 if tied else V * C)


@pytest.mark.parametrize(
    "values, kwargs",
    [
        ({}, {}),
        ({"bias": False}, {"bias": False}),
        ({"tie_embeddings": False}, {"tied": False}),
        ({"norm_position": "post", "final_norm": False}, {"final_norm": False}),
        ({"position": "rotary"}, {"learned": False}),
        ({"mlp_ratio": 2}, {"ratio": 2}),
        ({"vocab_multiple": 128}, {}),  # padding rows are not parameters of the vocabulary
    ],
)
def test_custom_model_section_is_counted(values, kwargs):
    config = model_config(vocab_size=1000, block_size=200, n_layer=3, n_head=4, n_embd=96, **values)
    model = build_model(config, device="meta")
    assert module_parameter_count(model) == expected_count(1000, 200, 3, 96, **kwargs)


@pytest.mark.slow
def test_fresh_gpt2_starts_at_uniform_loss():
    """A fresh model predicts near-uniformly: loss ≈ ln(50257) = 10.82. Exactly, logits = ln_f(x)·wte with
    wte ~ N(0, 0.02²) have variance n_embd·0.02² = 0.307, and E[logsumexp] of V such logits is
    ln V + σ²/2, so the expected start is 10.825 + 0.154 = 10.979."""
    torch.manual_seed(0)
    config = model_config(preset="gpt2")
    model = build_model(config).eval()
    idx = torch.randint(0, 50257, (4, 256))
    targets = torch.randint(0, 50257, (4, 256))
    with torch.no_grad():
        _, loss = model(idx, targets)
    variance = config.n_embd * config.init_std**2
    assert abs(loss.item() - (math.log(50257) + variance / 2)) < 0.05
    assert abs(loss.item() - math.log(50257)) < 0.2


def small(**values):
    torch.manual_seed(0)
    config = model_config(**{"vocab_size": 97, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, **values})
    return build_model(config).eval()


def test_padding_only_suffix_gives_finite_logits_equal_to_unpadded():
    model = small()
    real = torch.randint(0, 97, (1, 9))
    padded = torch.cat([real, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 7)], dim=1).long()
    with torch.no_grad():
        alone, _ = model(real)
        both, _ = model(padded, padding_mask=mask)
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[:, :9], alone, atol=1e-5, rtol=0)


def test_left_padding_keeps_every_row_finite():
    """A padding query before any real token has no key to attend; it must not become NaN."""
    model = small()
    idx = torch.randint(0, 97, (2, 8))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    with torch.no_grad():
        logits, _ = model(idx, padding_mask=mask)
    assert torch.isfinite(logits).all()


def test_padding_mask_keeps_the_key_axis():
    """Padding must hide keys (columns), not queries (rows): a real token never sees a padded one."""
    model = small(attention="bidirectional")
    idx = torch.randint(0, 97, (1, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    changed = idx.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx, padding_mask=mask)
        b, _ = model(changed, padding_mask=mask)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)


def perturb_and_compare(model, position, **kwargs):
    """Which output positions change when the token at `position` changes."""
    idx = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, position] = (changed[0, position] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx, **kwargs)
        b, _ = model(changed, **kwargs)
    return [(a[0, t] - b[0, t]).abs().max().item() > 1e-6 for t in range(12)]


def test_causal_bidirectional_and_sliding_window_change_exactly_what_they_should():
    causal = perturb_and_compare(small(), 6)
    assert causal == [t >= 6 for t in range(12)]
    bidirectional = perturb_and_compare(small(attention="bidirectional"), 6)
    assert all(bidirectional)
    # One layer, so the receptive field is exactly the window: position t sees tokens t-3..t.
    window = perturb_and_compare(small(attention="sliding_window", sliding_window=4, n_layer=1), 6)
    assert window == [6 <= t <= 9 for t in range(12)]
    # The per-call override and a custom boolean mask give the same patterns.
    assert perturb_and_compare(small(), 6, attention="bidirectional") == bidirectional
    eye = torch.eye(12, dtype=torch.bool)
    assert perturb_and_compare(small(), 6, attention=eye) == [t == 6 for t in range(12)]
    assert perturb_and_compare(small(), 6, attention=eye[None, None]) == [t == 6 for t in range(12)]


def test_custom_causal_mask_equals_the_default_path():
    model = small()
    idx = torch.randint(0, 97, (2, 10))
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool)).expand(2, 10, 10)
    with torch.no_grad():
        default, _ = model(idx)
        custom, _ = model(idx, attention=causal)
    torch.testing.assert_close(custom, default, atol=1e-6, rtol=0)


def reference_block(x, block, norm_position):
    """One block written out from the papers, independent of the module code."""
    C = x.size(-1)
    H = block.attn.n_head

    def ln(t, module):
        return F.layer_norm(t, (C,), module.weight, module.bias, 1e-5)

    def attention(t):
        qkv = t @ block.attn.c_attn.weight.T + block.attn.c_attn.bias
        q, k, v = qkv.split(C, dim=-1)
        heads = lambda z: z.view(z.size(0), z.size(1), H, C // H).transpose(1, 2)  # (B, H, T, D)
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(C // H)
        T = t.size(1)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(t.shape)  # (B, T, C)
        return y @ block.attn.c_proj.weight.T + block.attn.c_proj.bias

    def mlp(t):
        h = t @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's GELU
        return h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias

    if norm_position == "pre":  # GPT-2
        x = x + attention(ln(x, block.ln_1))
        return x + mlp(ln(x, block.ln_2))
    x = ln(x + attention(x), block.ln_1)  # GPT-1
    return ln(x + mlp(x), block.ln_2)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_layer_order_matches_the_hand_written_reference(norm_position):
    model = small(norm_position=norm_position, final_norm=norm_position == "pre")
    with torch.no_grad():
        for p in model.parameters():  # make LayerNorm gains/biases non-trivial so their place matters
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(model.h[0](x), reference_block(x, model.h[0], norm_position), atol=1e-5, rtol=1e-5)
        other = "post" if norm_position == "pre" else "pre"
        assert (model.h[0](x) - reference_block(x, model.h[0], other)).abs().max() > 1e-2


def test_gpt1_has_no_final_norm_and_gpt2_has_one():
    gpt1 = build_model(model_config(preset="openai-gpt"), device="meta")
    gpt2 = build_model(model_config(preset="gpt2"), device="meta")
    assert gpt1.ln_f is None and not gpt1.h[0].pre_norm
    assert gpt2.ln_f is not None and gpt2.h[0].pre_norm
    assert gpt2.lm_head.weight is gpt2.wte.weight


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model(model_config(vocab_size=500, n_layer=8, n_head=4, n_embd=256, block_size=64))
    expected = 0.02 / math.sqrt(2 * 8)
    for block in model.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.c_attn.bias == 0)


def test_rotary_positions_are_relative():
    """With RoPE and no learned positions, shifting every position by the same amount changes nothing."""
    model = small(position="rotary")
    assert model.wpe is None
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        base, _ = model(idx)
        shifted, _ = model(idx, position_ids=torch.arange(5, 15).expand(2, 10))
        learned, _ = small()(idx)
        learned_shifted, _ = small()(idx, position_ids=torch.arange(5, 15).expand(2, 10))
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
    assert (learned - learned_shifted).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
def test_activations_are_the_named_functions(activation):
    model = small(activation=activation)
    x = torch.linspace(-3, 3, 50)
    reference = {"gelu": F.gelu(x), "relu": F.relu(x), "silu": F.silu(x),
                 "gelu_new": 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))}[activation]
    torch.testing.assert_close(model.h[0].mlp.act(x), reference, atol=1e-6, rtol=0)


def test_padded_vocabulary_keeps_logits_and_counts_exact():
    model = small(vocab_multiple=64)
    assert model.wte.weight.shape[0] == 128
    logits, loss = model(torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 5)))
    assert logits.shape == (2, 5, 97) and torch.isfinite(loss)
    assert module_parameter_components(model)["wte (token embedding)"] == 97 * 32


def test_context_overflow_is_refused():
    with pytest.raises(ValueError, match="exceeds the context of 32"):
        small()(torch.zeros(1, 33, dtype=torch.long))


def test_rotary_trains_on_sequences_longer_than_block_size():
    """train.seq_len may exceed block_size with rotary positions (the config allows it): the training
    forward and backward run, and give what the same weights give with a context that covers them."""
    short = small(position="rotary", block_size=16).train()
    long = small(position="rotary", block_size=48).train()
    long.load_state_dict(short.state_dict())  # no position table: the same tensors fit both
    idx, targets = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 40))
    logits, loss = short(idx, targets)
    loss.backward()
    expected, expected_loss = long(idx, targets)
    assert logits.shape == (2, 40, 97) and torch.isfinite(loss)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in short.parameters())
    with pytest.raises(ValueError, match="KV cache"):  # a cache is still bounded by its room
        short(idx, kv_cache=short.new_kv_cache(batch=2))


def test_kv_cache_gives_the_same_logits_as_a_full_pass():
    model = small()
    idx = torch.randint(0, 97, (2, 12))
    cache = model.new_kv_cache(batch=2)
    with torch.no_grad():
        full, _ = model(idx)
        prefill, _ = model(idx[:, :8], kv_cache=cache)
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=0)


def test_the_kv_cache_advances_and_truncates_through_its_own_methods():
    """Forgetting positions (rejected draft tokens) and feeding others gives what feeding those alone gives."""
    model = small()
    idx = torch.randint(0, 97, (2, 12))
    cache = model.new_kv_cache(batch=2)
    with torch.no_grad():
        full, _ = model(idx)
        model(idx[:, :8], kv_cache=cache)
        model(torch.randint(0, 97, (2, 3)), kv_cache=cache)  # a draft that is rejected
        assert cache.length == 11
        cache.truncate(8)
        rest, _ = model(idx[:, 8:], kv_cache=cache)
    assert cache.length == 12
    torch.testing.assert_close(rest, full[:, 8:], atol=1e-5, rtol=0)
    with pytest.raises(AttributeError):
        cache.length = 3  # only advance and truncate change it
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(13)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        cache.advance(cache.max_len)


def test_the_chunked_loss_equals_cross_entropy_over_all_logits(monkeypatch):
    """Above LOSS_CHUNK_VALUES the loss runs in chunks with the softmax recomputed in backward; loss and
    gradients match F.cross_entropy over the whole (B·T, V) within 1e-6 (fp32, CPU)."""
    import gptcli.model as model_module

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = -100  # unscored positions count in neither the sum nor the mean
    expected = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    monkeypatch.setattr(model_module, "LOSS_CHUNK_VALUES", 4 * 50)  # chunks of 4 rows: 6 chunks for 21 rows
    loss = model_module.chunked_cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    assert abs(loss.item() - expected.item()) < 1e-6
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_training_can_skip_the_logits_and_gets_the_same_loss():
    model = build_model(project_from_dict({"model": {"preset": "nano"}}).model)
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx, idx)
    none, same_loss = model(idx, idx, return_logits=False)
    assert none is None and logits.shape == (2, 16, 50257) and torch.equal(loss, same_loss)
