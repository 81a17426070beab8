"""--verify: the converted model against transformers' own, on real text, in fp32."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import GptError
from .convert import BODY_PREFIX
from .source import WEIGHT_FILES, HFSource, HFWeights

VERIFY_TOLERANCE = 1e-4  # max |logit difference| in fp32; fp32 reorderings stay below ~1e-5 here

# One English paragraph for --verify: real words, so the comparison exercises real token statistics.
VERIFY_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk, counting the steps as his father "
    "had taught him. From the top he could see the harbour, the fishing boats returning with their catch, "
    "and the long grey line of the cliffs where the gulls nested in spring. He wrote the weather in a "
    "leather book: wind from the west, light rain, visibility good. Nobody had asked him to keep the "
    "record, but he kept it all the same, because a lamp that nobody watches is only half a lamp."
)


def verify_batch(tokenizer, config: ModelConfig) -> torch.Tensor:
    """(2, T) ids of VERIFY_TEXT: two windows of real text, T ≤ 64 and within the context."""
    ids = tokenizer.encode(VERIFY_TEXT)
    length = min(64, config.block_size, len(ids) // 2)
    batch = torch.tensor([ids[:length], ids[length:2 * length]], dtype=torch.long)  # (2, T)
    return batch % config.vocab_size  # a custom model with a smaller vocabulary still sees text-like ids


def reference_model(source: HFSource):
    """transformers' own model for the same files, in fp32 (the parity reference)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise GptError("--verify compares against transformers, which is not installed "
                       "(pip install transformers).") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # stderr is for gptcli's one-line messages
    transformers_logging.disable_progress_bar()
    standard = len(source.weights) == 1 and source.weights[0].name in WEIGHT_FILES
    if standard:
        return AutoModelForCausalLM.from_pretrained(str(source.directory)).float().eval()
    # A weights file under another name: transformers builds the model, the file is read as-is.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source.directory)))
    weights = HFWeights(source.weights)
    state = {name: weights.load(name).float() for name in list(weights.shapes)}  # HF names, HF layout
    if not any(name.startswith(BODY_PREFIX) for name in state):  # saved from GPT2Model: no `transformer.`
        state = {(name if name == "lm_head.weight" else BODY_PREFIX + name): t for name, t in state.items()}
    model.load_state_dict(state, strict=False)  # strict=False: old files also hold the mask buffers
    return model.float().eval()


def max_logit_difference(model, source: HFSource, tokenizer) -> float:
    """Max |logits(gptcli) - logits(transformers)| over a batch of real text, both in fp32."""
    batch = verify_batch(tokenizer, model.config)
    reference = reference_model(source)
    with torch.no_grad():
        expected = reference(batch).logits.float()  # (2, T, V)
        del reference
        logits, _ = model.float()(batch)  # (2, T, V)
    return (logits - expected).abs().max().item()


