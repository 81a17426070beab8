"""A random transformers GPT-2 and a gptcli GPT with the same weights, for parity tests."""

from __future__ import annotations

import tempfile

import torch

from gptcli.model import GPT


def hf_gpt2(seed: int = 0, vocab_size: int = 500, block_size: int = 64, n_layer: int = 2, n_head: int = 4,
            n_embd: int = 64, initializer_range: float = 0.02):
    """A seeded random GPT2LMHeadModel (eval mode, SDPA attention, fp32). A wider initializer_range gives
    peaked logits, so greedy text varies instead of repeating one token (a sharper parity test)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, initializer_range=initializer_range, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(config)
    return model.eval()


def twin_of(hf_model) -> GPT:
    """A gptcli GPT holding the same tensors as `hf_model`, imported the way `gpt load-hf` imports: the model is
    saved as a Hugging Face dir and read back through gptcli.hf (key map, transposes, exact buffer filter)."""
    from gptcli.hf.convert import convert_weights, model_config_from_hf
    from gptcli.hf.source import resolve_source

    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        source = resolve_source(directory)
        return convert_weights(source, model_config_from_hf(source.config, source.family)).eval()
