"""Document masking (attention.DOCUMENT, model.document_layout): a packed window gives each document the logits
it gets alone, with learned and rotary positions, through a KV cache too; it composes with a sliding window
and with a user's mask function; FlexAttention's block mask gives the dense mask's logits; the planner counts
the per-row mask it keeps."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from gptcli import planner
from gptcli.attention import AttentionPattern, causal_mask
from gptcli.config import project_from_dict
from gptcli.errors import GptError
from gptcli.model import build_model, document_layout

EOT = 96  # the small models' end-of-text token


def small(**values):
    torch.manual_seed(0)
    config = project_from_dict({"model": {"vocab_size": 97, "block_size": 48, "n_layer": 2, "n_head": 4,
                                          "n_embd": 32, "eot_id": EOT, **values}}).model
    return build_model(config).eval()


def documents(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    """Documents of these lengths, each but the last ended by the end-of-text token."""
    generator = torch.Generator().manual_seed(seed)
    made = [torch.randint(0, EOT, (length,), generator=generator) for length in lengths]
    for document in made[:-1]:
        document[-1] = EOT
    return made


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_a_packed_window_gives_each_document_the_logits_it_gets_alone(position):
    """fp32, within 1e-5: three documents packed in one row of 31 tokens, against three forward passes."""
    model = small(attention="document", position=position)
    parts = documents(9, 14, 8)
    with torch.no_grad():
        packed, _ = model(torch.cat(parts)[None])
        alone = torch.cat([model(part[None])[0] for part in parts], dim=1)
        causal, _ = model(torch.cat(parts)[None], attention="causal")
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert (causal[:, 9:] - alone[:, 9:]).abs().max() > 1e-3  # attending across documents changes them


def test_positions_restart_after_each_end_of_text_token():
    idx = torch.tensor([[5, EOT, 7, 8, EOT, EOT, 3]])
    found, ends, bases, positions = document_layout(idx, torch.arange(7)[None], EOT)
    assert found.tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 0]]
    assert ends.tolist() == [[False, True, False, False, True, True, False]] and bases.tolist() == [[0, 0, 2, 2, 2, 5, 6]]


def test_a_kv_cache_continues_the_documents_of_what_it_holds():
    """Feeding a packed row three tokens at a time through a cache gives the logits of one forward pass, and
    after a rollback (truncate) the documents continue from where the cache was cut."""
    model = small(attention="document")
    row = torch.cat(documents(7, 11, 9))[None]
    cache = model.new_kv_cache(1, 48)
    with torch.no_grad():
        whole, _ = model(row)
        pieces = [model.head(model.hidden_states(row[:, at:at + 3], kv_cache=cache)) for at in range(0, 27, 3)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=0)
        cache.truncate(10)
        again = model.head(model.hidden_states(row[:, 10:], kv_cache=cache))
    torch.testing.assert_close(again, whole[:, 10:], atol=1e-5, rtol=0)


def test_documents_compose_with_a_sliding_window_and_with_a_users_mask_function():
    """document_sliding_window is the sliding window inside each document; a user's pattern that keeps to
    documents gets them in its MaskContext and is intersected with them the same way."""
    model = small(attention="document_sliding_window", sliding_window=4)
    parts = documents(10, 12)
    with torch.no_grad():
        packed, _ = model(torch.cat(parts)[None])
        alone = torch.cat([model(part[None], attention="sliding_window")[0] for part in parts], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)

    seen = {}

    def every_other(context):
        """Causal, and only every other earlier key."""
        seen["documents"] = context.documents
        return causal_mask(context) & (context.distance % 2 == 0)

    user = AttentionPattern("every_other", "", every_other, documents=True)
    with torch.no_grad():
        packed, _ = model(torch.cat(parts)[None], attention=user)
        plain = AttentionPattern("every_other", "", every_other)
        alone = torch.cat([model(part[None], attention=plain)[0] for part in parts], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert seen["documents"] is None  # the plain pattern ran last: it is given no documents
    assert torch.equal(document_layout(torch.cat(parts)[None], torch.arange(22)[None], EOT)[0][0],
                       torch.tensor([0] * 10 + [1] * 12))


def test_a_mask_function_as_a_file_reference_trains_its_mask(tmp_path):
    """`attention = "masks.py:strided"` names a plain function of the MaskContext: the model uses its mask."""
    (tmp_path / "masks.py").write_text(
        "def strided(context):\n    '''Causal, keys an even distance back.'''\n"
        "    return (context.distance >= 0) & (context.distance % 2 == 0)\n")
    (tmp_path / "run.toml").write_text('[model]\nattention = "masks.py:strided"\nvocab_size = 97\nblock_size = 48\n'
                                       "n_layer = 2\nn_head = 4\nn_embd = 32\n")
    from gptcli.config import load_project

    config = load_project(tmp_path / "run.toml").model
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.pattern.description == "Causal, keys an even distance back."
    idx = torch.randint(0, 97, (1, 12))
    distance = torch.arange(12)[:, None] - torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model(idx, attention=(distance >= 0) & (distance % 2 == 0))[0],
                                   atol=1e-6, rtol=0)


def test_a_mask_function_that_fails_is_one_sentence():
    def broken(context):
        raise KeyError("levels")

    with pytest.raises(GptError, match=r'^The attention pattern "broken" failed to make its mask: KeyError: '
                                       r"'levels'\.$"):
        small()(torch.zeros(1, 4, dtype=torch.long), attention=AttentionPattern("broken", "", broken))


@pytest.mark.slow  # FlexAttention's first block masks trace their mask functions: seconds on the CPU
def test_flexattention_block_masks_give_the_dense_masks_logits(monkeypatch):
    """The FlexAttention path (CUDA's) run on the CPU, where torch runs it unfused: for each pattern with a
    mask_mod, the same logits as the dense mask within 1e-5 (fp32), with per-row documents and prefix draws."""
    import gptcli.model

    row = torch.cat(documents(9, 12, 11))[None].repeat(2, 1)
    flex_calls = []
    unfused = gptcli.model.flex_attention_function
    monkeypatch.setattr(gptcli.model, "flex_attention_function", lambda device: flex_calls.append(device) or unfused(device))
    for name in ("document", "document_sliding_window", "sliding_window", "prefix"):
        model = small(attention=name, sliding_window=5)
        draw = {"prefix": torch.tensor([7, 20])} if name == "prefix" else None
        with torch.no_grad():
            monkeypatch.setattr(gptcli.model, "FLEX_DEVICES", set())
            dense, _ = model(row, draw=draw)
            monkeypatch.setattr(gptcli.model, "FLEX_DEVICES", {"cpu"})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns that it runs flex_attention unfused without compile
                flex, _ = model(row, draw=draw)
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0, msg=name)
    assert flex_calls == ["cpu"] * 8  # two blocks, four patterns: every flex forward ran FlexAttention


def test_each_builtin_pattern_the_planner_knows_as_a_block_mask_has_a_mask_mod():
    """config.BLOCK_MASK_PATTERNS (the planner's names) are the built-ins with a mask_mod, causal aside (SDPA's
    is_causal runs it); ONE_MASK_PATTERNS read neither documents nor draws."""
    from gptcli.attention import attention_pattern
    from gptcli.config import BLOCK_MASK_PATTERNS, CAUSAL_PATTERN, ONE_MASK_PATTERNS
    from gptcli.registry import ATTENTION

    with_mod = {name for name in ATTENTION.builtins if attention_pattern(name).mask_mod is not None}
    assert with_mod - {CAUSAL_PATTERN} == BLOCK_MASK_PATTERNS
    assert not any(attention_pattern(name).documents for name in ONE_MASK_PATTERNS)


def test_the_planner_counts_the_per_row_mask_a_document_pattern_keeps():
    """What autograd keeps for a document-masked forward on the CPU (a (B, 1, T, T) mask per layer), as the
    planner counts it (mask_rows = the micro batch), within 3%; causal keeps none."""
    config = project_from_dict({"model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512,
                                          "block_size": 64, "attention": "document", "eot_id": 511}}).model
    torch.manual_seed(0)
    model = build_model(config).train()
    idx = torch.randint(0, 512, (4, 64))
    idx[:, ::9] = 511
    kept = kept_bytes(model, idx)
    shape = planner.ActivationShape(4, 64, 4, "cpu", custom_mask=True, mask_rows=4)
    assert planner.activation_memory(config, shape).kept == pytest.approx(kept, rel=0.03)
    one_mask = dataclasses.replace(shape, mask_rows=1)
    assert planner.activation_memory(config, shape).kept > planner.activation_memory(config, one_mask).kept


def kept_bytes(model, idx) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass (parameters left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(idx, torch.randint(0, 512, idx.shape), return_logits=False)
    return sum(seen.values())

