"""A random transformers GPT-2 and a gptcli GPT with the same weights, for parity tests."""

from __future__ import annotations

import torch

from gptcli.config import ModelConfig
from gptcli.model import GPT

# HF's GPT-2 stores these as Conv1D (in, out); gptcli's nn.Linear wants (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
    """A gptcli GPT holding the same tensors as `hf_model`."""
    c = hf_model.config
    config = ModelConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                         n_embd=c.n_embd)
    model = GPT(config)
    state = {}
    for name, tensor in hf_model.transformer.state_dict().items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers, not parameters
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D) else tensor.clone()
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()
