"""The README's first command, examples/demo.sh, in its parts: the built-in corpus is prose a small model learns
words from (not runs of spaces), and the prompts it samples from end in a word. The whole script runs in CI
(`.ci/run`, the README's set-up command 1)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import tomllib

from conftest import REPO

EXAMPLES = REPO / "examples"


def space_token_share(tokenizer, texts: list[str]) -> float:
    """The share of GPT-2 tokens that are only spaces or tabs."""
    ids = [token for text in texts for token in tokenizer.encode(text)]
    return sum(1 for token in ids if not tokenizer.decode([token]).strip(" \t")) / len(ids)


def test_the_demo_corpus_is_the_stdlibs_docstrings_without_indentation(tmp_path):
    """One complete JSON line per public module that has docstrings, no line of text indented; in GPT-2's tokens
    2.5% are spaces (Python 3.11's library), against 42% of the library's source, where the demo's model learnt
    to continue with spaces."""
    from gptcli.tokenizer import load_tokenizer

    out = tmp_path / "docstrings.jsonl"
    subprocess.run([sys.executable, EXAMPLES / "stdlib_docstrings.py", out], check=True)
    texts = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(texts) > 100 and all(texts) and sorted(p.name for p in tmp_path.iterdir()) == ["docstrings.jsonl"]
    assert not any(re.match(r"[ \t]", line) for text in texts for line in text.splitlines())
    assert any("Return the" in text for text in texts)
    tokenizer = load_tokenizer("gpt2")
    source = [p.read_text(encoding="utf-8", errors="replace")
              for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[!_]*.py"))]
    assert space_token_share(tokenizer, texts) < 0.05 < 0.3 < space_token_share(tokenizer, source)


def test_the_demos_prompts_end_in_a_word():
    """demo.sh's prompts (its corpus's and a user's) and cpu-demo.toml's: none gets the lone-space note that
    "def " (the demo's old prompt) gets."""
    from gptcli.generate import lone_space_note
    from gptcli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    script = (EXAMPLES / "demo.sh").read_text()
    project = tomllib.loads((EXAMPLES / "cpu-demo.toml").read_text())
    prompts = re.findall(r"^\s*prompt='([^']*)'", script, flags=re.M)
    prompts += [project["train"]["sample_prompt"], project["generate"]["prompt"]]
    assert len(prompts) == 4 and "Return the" in prompts
    assert [lone_space_note(tokenizer, prompt) for prompt in prompts] == [None] * 4
    assert lone_space_note(tokenizer, "def ") is not None
