"""Peak resident memory of `gpt load-hf` on a checkpoint of a published size, against the size of the
weights file and against transformers' own from_pretrained + save_pretrained of the same dir, measured in the same run.

    python bench/hf_load_memory.py --preset gpt2-medium [--workdir /tmp/hf-mem]

The checkpoint is random (no network): a config.json of the preset's shape and a model.safetensors
written tensor by tensor. Each measured step runs in its own process; its peak RSS comes from wait4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAKE_CHECKPOINT = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from gptcli.config import project_from_dict
from gptcli.hf.convert import hf_name_of
from gptcli.model import build_model
out, preset = Path(sys.argv[1]), sys.argv[2]
config = project_from_dict({"model": {"preset": preset}}).model
family = "openai-gpt" if config.norm_position == "post" else "gpt2"
model = build_model(config, device="meta")
tensors = {}
for name, tensor in model.state_dict().items():
    if name == "lm_head.weight":
        continue
    shape = tuple(reversed(tensor.shape)) if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else tensor.shape
    tensors[hf_name_of(name, family)] = torch.randn(shape) * 0.02
save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
hf = {"model_type": family, "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
      "n_layer": config.n_layer, "n_head": config.n_head, "layer_norm_epsilon": 1e-5}
hf.update({"afn": "gelu"} if family == "openai-gpt" else {"activation_function": "gelu_new"})
(out / "config.json").write_text(json.dumps(hf))
"""

IMPORTS_ONLY = "import torch, safetensors, gptcli.hf, gptcli.modeldir"

# The transformers-native equivalent of a conversion: read the checkpoint and write it out again.
TRANSFORMERS_LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).save_pretrained(sys.argv[2])
"""


def peak_rss(command: list[str], env: dict) -> tuple[int, float]:
    """Run `command`; return its peak resident set (bytes) and wall seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hf-mem-"))
    source = work / args.preset
    source.mkdir(parents=True, exist_ok=True)
    if not (source / "model.safetensors").is_file():
        peak_rss([sys.executable, "-c", MAKE_CHECKPOINT, str(source), args.preset], env)
    file_bytes = (source / "model.safetensors").stat().st_size
    baseline, _ = peak_rss([sys.executable, "-c", IMPORTS_ONLY], env)
    ours, ours_seconds = peak_rss([sys.executable, "-m", "gptcli", "load-hf", str(source), "--out",
                                   str(work / "converted"), "--force"], env)
    result = {"preset": args.preset, "weights_bytes": file_bytes, "imports_peak_rss": baseline,
              "load_hf_peak_rss": ours, "load_hf_seconds": round(ours_seconds, 1),
              "load_hf_over_weights": round((ours - baseline) / file_bytes, 2)}
    if not args.skip_transformers:
        theirs, theirs_seconds = peak_rss([sys.executable, "-c", TRANSFORMERS_LOAD, str(source),
                                                   str(work / "resaved")], env)
        result.update(transformers_load_save_peak_rss=theirs, transformers_seconds=round(theirs_seconds, 1),
                      load_hf_over_transformers=round(ours / theirs, 2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
