"""`gpt load-hf`: a Hugging Face GPT-2 / GPT-1 checkpoint → a gptcli model dir."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ..errors import GptError
from ..fsutil import output_lock, staged_dir
from .convert import convert_weights, model_config_from_hf
from .source import HFSource, resolve_source
from .verify import VERIFY_TOLERANCE, max_logit_difference

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


def source_tokenizer(source: HFSource, vocab_size: int) -> tuple[Tokenizer, str]:
    """The tokenizer for the model dir and a line saying where it came from."""
    from ..tokenizer import load_tokenizer
    from ..tokenizer_files import find_bpe_files

    directory = source.directory
    if source.family == "openai-gpt":
        if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
            raise GptError(f"{directory} has no vocab.json + merges.txt: an openai-gpt model needs its own "
                           "tokenizer files (Hugging Face's openai-gpt repository has them).")
        tokenizer = load_tokenizer("openai-gpt", str(directory))
        note = f"openai-gpt tokenizer from {directory}"
    else:
        has_files = find_bpe_files(directory) is not None
        found: Optional[Tokenizer] = None
        note = f"{directory} has no vocab.json + merges.txt; using gptcli's default gpt2 tokenizer"
        if has_files:
            try:
                found = load_tokenizer("gpt2", str(directory))
                note = f"GPT-2 tokenizer from {directory}"
            except GptError as error:
                note = f"the tokenizer files in {directory} are not GPT-2's ({error}); using gptcli's default gpt2 tokenizer"
        tokenizer = found if found is not None else load_tokenizer("gpt2")
    if tokenizer.vocab_size > vocab_size:
        note += (f"; warning: the tokenizer has {tokenizer.vocab_size:,} tokens but the model only "
                 f"{vocab_size:,}, so text with the higher ids cannot be fed to it")
    return tokenizer, note


@dataclass
class LoadReport:
    out: Path
    family: str
    source: str
    weights: list[str]
    dtype: str
    parameters: int
    reference: Optional[int]
    preset: Optional[str]
    tokenizer: str
    tokenizer_note: str
    max_abs_diff: Optional[float] = None

    @property
    def matches(self) -> Optional[bool]:
        return None if self.reference is None else self.parameters == self.reference

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        return {**values, "out": str(self.out), "matches": self.matches, "tolerance": VERIFY_TOLERANCE}


def load_hf(source: str, out: Path | str, verify: bool = False, force: bool = False) -> LoadReport:
    """Convert a Hugging Face GPT-2 / GPT-1 into a gptcli model dir at `out` (written atomically; with
    `force`, it replaces only a model dir gptcli wrote, never the source itself)."""
    from ..modeldir import check_model_dir_replaceable

    out = Path(out)
    local = Path(source).expanduser()
    inputs = [local] if local.exists() else []
    # The check and the write under the output's lock: no other command publishes `out` meanwhile.
    with output_lock(out, "gpt load-hf", check=lambda: check_model_dir_replaceable(out, force, inputs)):
        return convert_into(source, out, verify)


def convert_into(source: str, out: Path, verify: bool) -> LoadReport:
    from ..inspect import reference_for
    from ..modeldir import MODEL_DIR, load_model_dir, write_model_files
    from ..planner import parameter_components

    hf = resolve_source(source)
    config = model_config_from_hf(hf.config, hf.family)
    tokenizer, tokenizer_note = source_tokenizer(hf, config.vocab_size)
    with staged_dir(out, "load-hf", MODEL_DIR) as staging:  # from here on, a stop or an error leaves `out` as it was
        model = convert_weights(hf, config)
        reference, _ = reference_for(config)
        report = LoadReport(out=out, family=hf.family, source=source, weights=[str(p) for p in hf.weights],
                            dtype=str(model.wte.weight.dtype).replace("torch.", ""),
                            parameters=sum(parameter_components(config).values()), reference=reference,
                            preset=config.preset, tokenizer=tokenizer.fingerprint, tokenizer_note=tokenizer_note)
        write_model_files(staging, model, tokenizer, metadata={"source": source})
        del model  # verify reads back what was written, so the file itself is what is proven
        if verify:
            report.max_abs_diff = max_logit_difference(load_model_dir(staging, dtype=torch.float32).model, hf, tokenizer)
            if not report.max_abs_diff <= VERIFY_TOLERANCE:
                raise GptError(f"--verify failed: the converted model's logits differ from transformers' by up to "
                               f"{report.max_abs_diff:.3g} (tolerance {VERIFY_TOLERANCE:g}); nothing was written to {out}.")
    return report
