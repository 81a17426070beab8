"""Named architectures: each with its family, its Hugging Face hub id, its reference parameter count and
published zero-shot scores, and where those figures come from. Everything that asks which preset a shape
is, which names the Hub serves or what a GPT-2 size scored asks this module.

Counts treat the tied LM head as the token embedding it shares, so it is counted once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .errors import GptError


@dataclass(frozen=True)
class Published:
    """A published score, with where it comes from."""

    value: float
    source: str


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict  # [model] keys that differ from the defaults
    reference: Optional[int]  # published total, tied head counted once; None when nothing is published
    source: str
    description: str
    family: str  # "gpt2" (OpenAI's GPT-2 and its distillation), "openai-gpt" (GPT-1), "gptcli" (CPU sizes)
    hub_id: Optional[str] = None  # the Hugging Face hub id `gpt load-hf` and train.init_from fetch; None: none
    train: dict = field(default_factory=dict)  # [train] keys that suit the preset's size (below the file's keys)
    scores: dict[str, dict[str, Published]] = field(default_factory=dict)  # task → metric → published score

    def sections(self) -> dict[str, dict]:
        """The project keys this preset sets, by section (the preset's name included)."""
        return {"model": {**self.model, "preset": self.name}, "train": dict(self.train)}


_GPT2 = {"vocab_size": 50257, "block_size": 1024, "norm_position": "pre", "final_norm": True,
         "activation": "gelu_new", "position": "learned", "tie_embeddings": True}

# Small models take large steps and learn what they can in a few hundred of them (examples/cpu-demo.toml,
# nano as it is: lr 3e-3, 200 steps, loss 10.5 → about 4 on the standard library's source); evaluating and
# saving every 50 steps shows progress within minutes on a CPU.
_SMALL_MODEL_TRAINING = {"eval_every": 50, "eval_batches": 10, "checkpoint_every": 50}

# Published zero-shot scores of OpenAI's GPT-2 checkpoints (docs/generate-eval.md has the sources in full).
LM_EVAL_GPT2 = "lm-evaluation-harness 0.4 hf backend, openai-community/gpt2"
GPT2_PAPER = "GPT-2 paper, Table 3 (its own LAMBADA protocol, not lm-eval's)"
# A zero-shot table with an openai-community/gpt2 row whose LAMBADA figures (40.06, 32.56%) are lm-eval 0.4's
# to the digit; only its columns that name one task and one metric are taken (not its "arc acc").
GPT2023_CARD = "crumb/gpt2023 model card (Hugging Face Hub, 2023), zero-shot table, row gpt2 (124m)"


def _lambada_in_the_paper(accuracy: float, perplexity: float) -> dict[str, dict[str, Published]]:
    return {"lambada": {"acc": Published(accuracy, GPT2_PAPER), "perplexity": Published(perplexity, GPT2_PAPER)}}


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
            family="openai-gpt", hub_id="openai-gpt",
        ),
        Preset("gpt2", {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768}, 124_439_808,
               "HF gpt2 config (Radford et al. 2019 'GPT-2 small'); tied lm_head", "GPT-2 small, 124M",
               family="gpt2", hub_id="gpt2",
               scores={"hellaswag": {"acc": Published(0.2892, LM_EVAL_GPT2), "acc_norm": Published(0.3114, LM_EVAL_GPT2)},
                       "lambada": {"acc": Published(0.3256, LM_EVAL_GPT2),
                                   "perplexity": Published(40.0554, LM_EVAL_GPT2)},
                       "piqa": {"acc": Published(0.6289, GPT2023_CARD)},
                       "winogrande": {"acc": Published(0.5161, GPT2023_CARD)},
                       "sciq": {"acc": Published(0.750, GPT2023_CARD)}}),
        Preset("gpt2-medium", {**_GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024}, 354_823_168,
               "HF gpt2-medium config; tied lm_head", "GPT-2 medium, 355M", family="gpt2", hub_id="gpt2-medium",
               scores=_lambada_in_the_paper(0.5548, 15.60)),
        Preset("gpt2-large", {**_GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280}, 774_030_080,
               "HF gpt2-large config; tied lm_head", "GPT-2 large, 774M", family="gpt2", hub_id="gpt2-large",
               scores=_lambada_in_the_paper(0.6012, 10.87)),
        Preset("gpt2-xl", {**_GPT2, "n_layer": 48, "n_head": 25, "n_embd": 1600}, 1_557_611_200,
               "HF gpt2-xl config; tied lm_head", "GPT-2 XL, 1.5B", family="gpt2", hub_id="gpt2-xl",
               scores=_lambada_in_the_paper(0.6324, 8.63)),
        Preset("distilgpt2", {**_GPT2, "n_layer": 6, "n_head": 12, "n_embd": 768}, 81_912_576,
               "HF distilgpt2 config (Sanh et al. 2019); tied lm_head", "DistilGPT2: GPT-2 small with 6 blocks",
               family="gpt2", hub_id="distilgpt2"),
        Preset("tiny", {**_GPT2, "block_size": 256, "n_layer": 4, "n_head": 4, "n_embd": 128}, None,
               "gptcli's own CPU-sized model; no published count",
               "4 blocks, 128 wide, 256 positions: its 300 default steps of 8 × 256 tokens take tens of minutes "
               "on a laptop CPU", family="gptcli",
               train={"max_steps": 300, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30} | _SMALL_MODEL_TRAINING),
        Preset("nano", {**_GPT2, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}, None,
               "gptcli's own smoke-test model; no published count",
               "2 blocks, 64 wide, 64 positions: its 200 default steps of 8 × 64 tokens take minutes on a CPU "
               "(loss 10.5 → about 4 on the standard library's source, examples/demo.sh)", family="gptcli",
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


def hub_ids() -> tuple[str, ...]:
    """The hub ids `gpt load-hf` and train.init_from fetch by name, in the presets' order."""
    return tuple(preset.hub_id for preset in PRESETS.values() if preset.hub_id)


def family_of(name: Optional[str]) -> Optional[str]:
    """The family of the preset named `name` (None for no preset, or a name that is none)."""
    preset = PRESETS.get(name or "")
    return preset.family if preset else None


def preset_for_shape(config) -> tuple[Optional[Preset], Optional[str]]:
    """(the preset whose architecture `config` (a ModelConfig) has, whatever its `preset` key says; the preset
    it names when that is not its architecture, else None). Architecture is ModelConfig.architecture_dict:
    changing any such key of a preset (mlp_ratio included, though no preset lists it) makes another shape.
    When the named preset has the shape it is the one returned."""
    shapes = _preset_architectures(type(config))
    shape = config.architecture_dict()
    named = config.preset if config.preset in PRESETS else None
    if named is not None and shapes[named] == shape:
        return PRESETS[named], None
    same = next((PRESETS[name] for name, architecture in shapes.items() if architecture == shape), None)
    return same, named


def _preset_architectures(schema: type) -> dict[str, dict]:
    """Each preset's architecture as `schema` (config.ModelConfig: its defaults under the preset's keys)
    builds it. The schema is passed in, not imported: config.py reads this module to apply a preset."""
    return {name: dataclasses.replace(schema(), **preset.model, preset=name).architecture_dict()
            for name, preset in PRESETS.items()}
