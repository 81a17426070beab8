"""Hugging Face weights in (`gpt load-hf`) and out (`gpt export-hf`), one module per job:

    source.py   find a checkpoint (dir, weights file, hub id) and read its tensors (safetensors, .bin)
    convert.py  config.json → [model], the key map and transposes, checks (names, shapes, dtypes, finite)
    verify.py   --verify: logits against transformers' own model
    load.py     gpt load-hf: source → converted model → model dir
    export.py   gpt export-hf: model dir → Hugging Face dir (config.json, model.safetensors, tokenizer files)

Two layouts, both read from config.json's `model_type`:
  gpt2        GPT2LMHeadModel (gpt2, gpt2-medium/-large/-xl, distilgpt2, or any shape): pre-LN, ln_f.
  openai-gpt  OpenAIGPTLMHeadModel (GPT-1): post-LN, no final LayerNorm, 512 positions.
"""

from .export import ExportReport, export_hf
from .load import LoadReport, load_hf

__all__ = ["ExportReport", "LoadReport", "export_hf", "load_hf"]
