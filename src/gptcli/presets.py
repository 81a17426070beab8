"""Named architectures, each with its reference parameter count and where that count comes from.

Counts treat the tied LM head as the token embedding it shares, so it is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import GptError


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict  # [model] keys that differ from the defaults
    reference: Optional[int]  # published total, tied head counted once; None when nothing is published
    source: str
    description: str
    train: dict = field(default_factory=dict)  # [train] keys that suit the preset's size (below the file's keys)

    def sections(self) -> dict[str, dict]:
        """The project keys this preset sets, by section (the preset's name included)."""
        return {"model": {**self.model, "preset": self.name}, "train": dict(self.train)}


_GPT2 = {"vocab_size": 50257, "block_size": 1024, "norm_position": "pre", "final_norm": True,
         "activation": "gelu_new", "position": "learned", "tie_embeddings": True}

# Small models take large steps and learn what they can in a few hundred of them (examples/cpu-demo.toml,
# nano as it is: lr 3e-3, 200 steps, loss 10.5 → about 4 on the standard library's source); evaluating and
# saving every 50 steps shows progress within minutes on a CPU.
_SMALL_MODEL_TRAINING = {"eval_every": 50, "eval_batches": 10, "checkpoint_every": 50}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "openai-gpt",
            {"vocab_size": 40478, "block_size": 512, "n_layer": 12, "n_head": 12, "n_embd": 768,
             "norm_position": "post", "final_norm": False, "activation": "gelu_new", "position": "learned",
             "tie_embeddings": True},
            116_534_784,
            "Radford et al. 2018 (GPT-1); HF openai-gpt config: 40478*768 + 512*768 + 12 blocks * 7,087,872",
            "GPT-1: 12 post-LN blocks, 768 wide, 512 positions, 40,478-token BPE",
        ),
        Preset("gpt2", {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768}, 124_439_808,
               "HF gpt2 config (Radford et al. 2019 'GPT-2 small'); tied lm_head", "GPT-2 small, 124M"),
        Preset("gpt2-medium", {**_GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024}, 354_823_168,
               "HF gpt2-medium config; tied lm_head", "GPT-2 medium, 355M"),
        Preset("gpt2-large", {**_GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280}, 774_030_080,
               "HF gpt2-large config; tied lm_head", "GPT-2 large, 774M"),
        Preset("gpt2-xl", {**_GPT2, "n_layer": 48, "n_head": 25, "n_embd": 1600}, 1_557_611_200,
               "HF gpt2-xl config; tied lm_head", "GPT-2 XL, 1.5B"),
        Preset("distilgpt2", {**_GPT2, "n_layer": 6, "n_head": 12, "n_embd": 768}, 81_912_576,
               "HF distilgpt2 config (Sanh et al. 2019); tied lm_head", "DistilGPT2: GPT-2 small with 6 blocks"),
        Preset("tiny", {**_GPT2, "block_size": 256, "n_layer": 4, "n_head": 4, "n_embd": 128}, None,
               "gptcli's own CPU-sized model; no published count",
               "4 blocks, 128 wide, 256 positions: its 300 default steps of 8 × 256 tokens take tens of minutes "
               "on a laptop CPU",
               train={"max_steps": 300, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30} | _SMALL_MODEL_TRAINING),
        Preset("nano", {**_GPT2, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}, None,
               "gptcli's own smoke-test model; no published count",
               "2 blocks, 64 wide, 64 positions: its 200 default steps of 8 × 64 tokens take minutes on a CPU "
               "(loss 10.5 → about 4 on the standard library's source, examples/demo.sh)",
               train={"max_steps": 200, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20} | _SMALL_MODEL_TRAINING),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else f" (known: {', '.join(PRESETS)})"
        raise GptError(f'Unknown preset "{name}"{hint}.') from None
