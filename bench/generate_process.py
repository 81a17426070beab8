"""Generation end to end: a fresh `gpt generate` process against a fresh process running transformers'
`from_pretrained` + `generate`, as each is used from a shell.

A random GPT-2 124M is saved with transformers (config.json, model.safetensors, the GPT-2 tokenizer
files); gptcli reads the same weights through `gpt load-hf`. Both decode greedily, 200 new tokens by
default, from the same prompt; the texts are checked to be equal. Each command is a new Python process,
timed from start to exit (imports, loading, the prompt, every step, the exit), in turns, best of
--repeats; the threads are torch's default in both unless --threads sets OMP_NUM_THREADS for both
(1 keeps timings steadier on a busy machine).

    python bench/generate_process.py [--new-tokens 200] [--repeats 3] [--threads N] [--json]
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PROMPT = "The quick brown fox jumps over the lazy dog."

TRANSFORMERS = """\
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory)
ids = tokenizer(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(prompt + tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""


THREADS: dict[str, str] = {}  # --threads: OMP_NUM_THREADS for both processes


def environment() -> dict:
    env = {**os.environ, **THREADS, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    if (SHARED / "tiktoken_cache").is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    return env


def make_models(directory: Path) -> tuple[Path, Path]:
    """A random GPT-2 124M as transformers saves it, and the gptcli model dir `gpt load-hf` makes of it."""
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
            "from transformers import GPT2Config, GPT2LMHeadModel\n"
            "from gptcli.hf import load_hf\nfrom gptcli.tokenizer import load_tokenizer\n"
            f"directory = {str(directory)!r}\n"
            "torch.manual_seed(0)\nGPT2LMHeadModel(GPT2Config()).save_pretrained(directory + '/hf')\n"
            "load_tokenizer('gpt2').save_for_hf(directory + '/hf', 1024)\n"
            "load_hf(directory + '/hf', directory + '/gptcli')\n")
    subprocess.run([sys.executable, "-c", code], env=environment(), check=True, capture_output=True)
    return directory / "hf", directory / "gptcli"


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{command[:4]} failed: {result.stderr[-2000:]}")
    return seconds, result.stdout.rstrip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, model_dir = make_models(Path(tmp))
        commands = {
            "transformers": [sys.executable, "-c", TRANSFORMERS, str(hf_dir), PROMPT, str(args.new_tokens)],
            "gpt generate": [sys.executable, "-m", "gptcli", "generate", PROMPT, "--checkpoint", str(model_dir),
                             "--max-new-tokens", str(args.new_tokens), "--temperature", "0"],
        }
        best, texts = {}, {}
        for _ in range(args.repeats):
            for name, command in commands.items():
                seconds, texts[name] = timed(command)
                best[name] = min(best.get(name, float("inf")), seconds)
    report = {"new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads or "default",
              "seconds": {k: round(v, 3) for k, v in best.items()},
              "speedup": round(best["transformers"] / best["gpt generate"], 3),
              "same_text": texts["transformers"] == texts["gpt generate"]}
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
