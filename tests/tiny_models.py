"""The smallest model dir gptcli writes (one layer, 16 wide, GPT-2's vocabulary): for the tests of what
reads or converts a model dir, where the weights' values do not matter."""

from __future__ import annotations

from pathlib import Path


def tiny_model_dir(directory: Path) -> Path:
    """A model dir at `directory` (created), as `gpt train` or `gpt load-hf` leaves one; returns it."""
    from gptcli.config import ModelConfig
    from gptcli.model import GPT
    from gptcli.modeldir import save_model_dir
    from gptcli.tokenizer import load_tokenizer

    return save_model_dir(directory, GPT(ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)),
                          load_tokenizer("gpt2"))
