"""Shared fixtures: the CLI as a user runs it, the GPT-2 vocabulary files, a corpus the tests make
themselves, GPU skipping.

The suite needs nothing beside the repository but the GPT-2 vocabulary: from ../shared when it exists,
else through tiktoken's own download and cache (TIKTOKEN_CACHE_DIR). Without either, the run stops at
its start with one message instead of failing or skipping test after test.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_GPT2_BPE = SHARED / "gpt2_bpe"

if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

# The files tiktoken's `gpt2` encoding reads, with the sha256 it expects (tiktoken_ext/openai_public.py).
GPT2_VOCAB_URLS = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
# r50k_base.tiktoken: the same ranks in tiktoken's one-file format; its published sha256 (tiktoken's
# `r50k_base` encoding) proves a file written from the ranks above is byte for byte OpenAI's.
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# What the vocabulary check at the session's start read (file name → bytes), when ../shared has no copy.
_downloaded_vocabulary: dict[str, bytes] = {}


def pytest_sessionstart(session):
    """Stop the whole run at once, with one message, when the project's dependencies are not installed or
    the GPT-2 vocabulary cannot be had."""
    try:
        import tiktoken.load

        import gptcli  # noqa: F401
    except ImportError as error:
        raise pytest.UsageError(
            f"The tests need gptcli and its test dependencies installed in this Python ({sys.executable}), and "
            f"{error.name} is not: run pip install -e \".[test]\" first, as the README's set-up says.") from None

    if SHARED_GPT2_BPE.is_dir():
        return
    try:
        for name, (url, sha256) in GPT2_VOCAB_URLS.items():
            _downloaded_vocabulary[name] = tiktoken.load.read_file_cached(url, sha256)
    except Exception as error:  # requests' connection errors, OSError, a hash mismatch
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        cache = f"TIKTOKEN_CACHE_DIR={cache}" if cache else "its default cache (TIKTOKEN_CACHE_DIR is not set)"
        raise pytest.UsageError(
            f"The tests need the GPT-2 vocabulary and found none: no {SHARED_GPT2_BPE} beside the repository, "
            f"and tiktoken could neither read its gpt2 files from {cache} nor download them "
            f"({type(error).__name__}); run the tests once with network access, or set TIKTOKEN_CACHE_DIR "
            "to a tiktoken cache that holds them.") from None


def gpt2_vocab_bytes(name: str) -> bytes:
    """encoder.json or vocab.bpe, OpenAI's GPT-2 vocabulary files: ../shared's copy, else tiktoken's."""
    if SHARED_GPT2_BPE.is_dir():
        return (SHARED_GPT2_BPE / name).read_bytes()
    return _downloaded_vocabulary[name]


@pytest.fixture(scope="session")
def gpt2_vocab(tmp_path_factory) -> Path:
    """A dir with GPT-2's vocabulary in OpenAI's files (encoder.json, vocab.bpe) and in tiktoken's format
    (r50k_base.tiktoken): ../shared's copy, else the files tiktoken downloaded, written out here."""
    if SHARED_GPT2_BPE.is_dir():
        return SHARED_GPT2_BPE
    directory = tmp_path_factory.mktemp("gpt2_bpe")
    for name in GPT2_VOCAB_URLS:
        (directory / name).write_bytes(gpt2_vocab_bytes(name))
    import tiktoken

    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
    lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(
        ranks.items(), key=lambda item: item[1]))
    assert hashlib.sha256(lines.encode()).hexdigest() == R50K_SHA256
    (directory / "r50k_base.tiktoken").write_text(lines)
    return directory


# --- a corpus every machine has ------------------------------------------------------------------------------

CORPUS_CHARS = 1_200_000  # the most any test reads


def stdlib_text(chars: int = CORPUS_CHARS) -> str:
    """The first `chars` characters of the Python standard library's top-level modules, in name order: text
    every machine that runs the tests has (examples/demo.sh trains on the same files). It differs between
    Python versions, so tests compute what they expect from it rather than writing numbers down."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(path.read_text(encoding="utf-8"))
        total += len(parts[-1])
        if total >= chars:
            break
    text = "".join(parts)[:chars]
    assert len(text) == chars, f"the standard library holds only {len(text)} characters of top-level modules"
    return text


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """corpus.txt: CORPUS_CHARS characters of the standard library's source, written once per test run."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(stdlib_text(), encoding="utf-8")
    return path


# --- the example plugin package, installed ----------------------------------------------------------------

PLUGINS = REPO / "examples" / "plugins"


@pytest.fixture(scope="session")
def installed_plugins(tmp_path_factory):
    """examples/plugins installed as a user installs a plugin package (pip, into a directory of its own, so
    the environment is left as it was): its entry points make its names plain names in this process (the
    directory is put on sys.path) and in the processes tests start (`env`: PYTHONPATH for gpt_env)."""
    import shutil

    from gptcli.registry import entry_points

    source = tmp_path_factory.mktemp("plugin-source") / "plugins"
    shutil.copytree(PLUGINS, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")  # pip builds in the copy: nothing is written into the repository
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    sys.path.insert(0, str(target))
    entry_points.cache_clear()
    yield {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(target), os.environ.get("PYTHONPATH", "")])}
    sys.path.remove(str(target))
    entry_points.cache_clear()


# --- the command line and the hardware ------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def gpt_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("COLUMNS", "200")
    env.update(extra or {})
    return env


# A wait in a test that lasts this long is a hang, not a slow machine: the bound only stops a test that would
# otherwise never end. No test asserts that anything is fast.
HANG_SECONDS = 600


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    """Poll `condition()` until it holds; fail if `process` exits first, or hangs past HANG_SECONDS."""
    deadline = time.monotonic() + HANG_SECONDS
    while not condition():
        if process.poll() is not None:
            output = process.communicate()
            pytest.fail(f"the process exited ({process.returncode}) before {what}: {output}")
        if time.monotonic() > deadline:
            pytest.fail(f"still no {what} after {HANG_SECONDS} s: the process hangs")
        time.sleep(0.05)


def run_gpt(*args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None,
            timeout: float = HANG_SECONDS) -> subprocess.CompletedProcess:
    """Run `python -m gptcli ARGS` in a fresh process, as a user would run `gpt ARGS`."""
    return subprocess.run([sys.executable, "-m", "gptcli", *map(str, args)], cwd=cwd, env=gpt_env(env),
                          input=input, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the fragments, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def module_parameter_components(model) -> dict[str, int]:
    """A built GPT's parameters per component, counted from its modules (tied head once, vocabulary padding
    left out): what gptcli's own count, planner.parameter_components from the configuration, is held to."""
    c = model.config
    padding_rows = (c.padded_vocab_size - c.vocab_size) * c.n_embd

    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    blocks = model.h
    return {
        "wte (token embedding)": model.wte.weight.numel() - padding_rows,
        "wpe (position embedding)": numel(model.wpe),
        "attention (all blocks)": sum(numel(b.attn) for b in blocks),
        "mlp (all blocks)": sum(numel(b.mlp) for b in blocks),
        "layernorms (all blocks)": sum(numel(b.ln_1) + numel(b.ln_2) for b in blocks),
        "ln_f (final norm)": numel(model.ln_f),
        "lm_head": 0 if c.tie_embeddings else model.lm_head.weight.numel() - padding_rows,
    }


def module_parameter_count(model) -> int:
    return sum(module_parameter_components(model).values())
