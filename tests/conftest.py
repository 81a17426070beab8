"""Shared fixtures: the CLI as a user runs it, the GPT-2 vocabulary files, a corpus the tests make
themselves, GPU skipping, and the training tests' one project builder, `gpt train` helper, shards and
reference run (a nano run every test that only needs a finished run dir, or its losses, reads or copies).

The suite needs nothing beside the repository but the GPT-2 vocabulary: from ../shared when it exists,
else through tiktoken's own download and cache (TIKTOKEN_CACHE_DIR). Without either, the run stops at
its start with one message instead of failing or skipping test after test.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_GPT2_BPE = SHARED / "gpt2_bpe"

if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # Started in the background of a shell without job control (`cmd &`, nohup), this process and every child
    # would inherit SIGINT ignored, and Python turns no Ctrl-C into KeyboardInterrupt in a process that starts
    # so: the tests that stop a `gpt` with SIGINT would see it run on. The processes tests start get SIGINT's
    # default, as from a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest-xdist starts its workers with COLUMNS=80 and LINES=24: rich would fix gptcli's consoles at 80 columns
    # when gptcli.cli is imported, and pass 80 on to every `gpt` a test starts. A worker runs as one process does.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
# The processes the tests start keep the memory torch frees (glibc's malloc reads these at a process's start)
# instead of handing each large freed block back to the kernel: a quarter less CPU per `gpt train`, and a higher
# peak resident memory (docs/architecture.md, "Running the tests"). A test that measures a process's memory
# starts it with USERS_ALLOCATOR, as users run it.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
USERS_ALLOCATOR: dict = dict.fromkeys(KEEP_FREED_MEMORY)  # gpt_env: None removes a variable
for _name, _value in KEEP_FREED_MEMORY.items():
    os.environ.setdefault(_name, _value)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Workers share the cores, and torch's OpenMP threads spin on a core while they wait for work: one worker's
    # waiting threads take the core another worker's run computes on. Passive waiting lets them sleep
    # (docs/architecture.md, "Running the tests", has the figures).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    """The environment of a `gpt` a test starts: this one, gptcli's source first on the path, `extra` over it
    (a None value removes that variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "200"  # tables and help as wide as the tests read them, whatever terminal runs pytest
    env.update(extra or {})
    return {name: value for name, value in env.items() if value is not None}


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


# --- the environment: changed only through monkeypatch ---------------------------------------------------------


# Variables a library sets once, when it is first imported (a test that imports it in this process sets them).
LIBRARY_IMPORT_VARIABLES = {
    "PYTORCH_NVML_BASED_CUDA_CHECK",  # deepspeed/__init__.py (0.19): os.environ.setdefault(..., "1")
    "TORCHINDUCTOR_CACHE_DIR",  # torch/_inductor/runtime/cache_dir_utils.cache_dir(), the first time it is asked
    "HF_XET_HIGH_PERFORMANCE",  # lm_eval/__init__.py (0.4): os.environ.setdefault(..., "1")
    "KMP_DUPLICATE_LIB_OK",  # threadpoolctl and sklearn at import (datasets and lm_eval import them)
}


@pytest.fixture(autouse=True)
def environment_left_as_found():
    """Fail a test that changes os.environ other than through monkeypatch (which undoes its changes): under
    pytest-xdist a worker runs tests in any order, and a variable one test leaves behind (RANK, MASTER_PORT,
    DS_ACCELERATOR, ...) would change what the next one tests. The environment is put back either way.
    Left out: PYTEST_CURRENT_TEST, which pytest sets for each phase of a test, and what a library sets when it
    is first imported, whichever test that happens in (LIBRARY_IMPORT_VARIABLES)."""
    def variables() -> dict[str, str]:
        return {key: value for key, value in os.environ.items()
                if key != "PYTEST_CURRENT_TEST" and key not in LIBRARY_IMPORT_VARIABLES}

    before = variables()
    yield
    after = variables()
    if after != before:
        for key in after.keys() - before.keys():
            del os.environ[key]
        os.environ.update(before)
        changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
        pytest.fail(f"the test changed os.environ outside monkeypatch: {', '.join(changed)}")


# --- ports: none that two test processes can both pick --------------------------------------------------------

# A block of ports for each pytest-xdist worker (gw0, gw1, ...; the one process of a run without -n: block 0),
# below Linux's ephemeral range (32768-60999, /proc/sys/net/ipv4/ip_local_port_range), from which bind(0)
# draws: no other test process hands them out and the OS gives none of them to anyone who asks for a free one.
# A one-rank `gpt train` left to itself picks a free port and binds it seconds later, when DeepSpeed starts:
# another process may take it in between. `gpt train --nproc N` without MASTER_PORT has no such gap (torch's
# rendezvous store binds port 0 and the ranks share it), which test_train_distributed.py tests as users run it.
PORT_BLOCKS_START, PORTS_PER_WORKER = 20_000, 1024
_next_port = itertools.count()


def worker_ports() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
    start = PORT_BLOCKS_START + index * PORTS_PER_WORKER
    assert start + PORTS_PER_WORKER <= 32768, f"no port block below the ephemeral range for worker {worker}"
    return range(start, start + PORTS_PER_WORKER)


def worker_port() -> int:
    """The next port of this worker's block (each is handed out again only after the other 1023)."""
    ports = worker_ports()
    return ports[next(_next_port) % len(ports)]


# --- projects: one builder, through the project's own overrides -------------------------------------------------

# The nano run of the training tests, 8 steps of 128 tokens: dropout > 0 so that an exact resume must also
# restore the dropout RNG; accumulation 2 so that a resume must land between optimizer steps, not micro steps;
# device = "cpu": these are the CPU tests, on a machine with CUDA too (test_train_gpu.py holds the GPU ones).
# Small micro batches: what these runs test does not depend on their size, and nano's head over the GPT-2
# vocabulary is most of a step's work (a quarter of the tokens: a fifth less CPU per run).
NANO_RUN = {
    "project": {"seed": 1234},
    "model": {"preset": "nano", "dropout": 0.1},
    "train": {"max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 2, "seq_len": 32, "lr": 3e-3,
              "warmup_steps": 2, "checkpoint_every": 3, "eval_every": 4, "eval_batches": 2, "device": "cpu"},
    "deepspeed": {"zero_stage": 2},
}

# bf16 matrix products are slow on most CPUs (about 100 tokens/s for nano, against 1,400 in fp32): bf16 runs
# keep to micro batches of 2 × 32 tokens (NANO_RUN's own today) whatever size the fp32 runs take.
SMALL_BF16 = ('train.precision="bf16"', "train.micro_batch_size=2", "train.seq_len=32")


def project_file(directory: Path, shards: Path, *overrides: str, name: str = "run", base: dict = NANO_RUN,
                 without: tuple[str, ...] = ()) -> Path:
    """DIRECTORY/NAME.toml training into DIRECTORY/NAME on `shards`: `base` without the sections named in
    `without` (a run from weights sets no [model] key), then `--set`-style `overrides`. They go through the
    project's own loader, so a key that does not exist (or was renamed) fails here instead of quietly leaving
    the default in place; the file holds only the keys set, as a user's would."""
    from gptcli.config import apply_overrides, project_from_dict, toml_value

    raw = {section: dict(keys) for section, keys in base.items() if section not in without}
    raw.setdefault("project", {})["out_dir"] = str(directory / name)
    raw.setdefault("data", {})["dir"] = str(shards)
    raw = apply_overrides(raw, list(overrides))
    path = directory / f"{name}.toml"
    project_from_dict(raw, source=str(path))  # every key and value checked
    path.write_text("".join(f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())
                            for section, keys in raw.items()))
    return path


def out_dir(project: Path) -> Path:
    return Path(tomllib.loads(project.read_text())["project"]["out_dir"])


# --- gpt train, and what a run dir holds ---------------------------------------------------------------------


def train_env(ranks: int = 1, fault: str = "", probe: Path | None = None, env: dict | None = None) -> dict:
    """The variables a test's `gpt train` gets: GPTCLI_FAULT (train/faults.py), GPTCLI_PROBE_DIR
    (train/observing/probes.py), and for one rank a port of this worker's own (worker_port)."""
    added = {} if ranks > 1 else {"MASTER_PORT": str(worker_port())}
    if fault:
        added["GPTCLI_FAULT"] = fault
    if probe is not None:
        added["GPTCLI_PROBE_DIR"] = str(probe)
    return added | (env or {})


def train(project: Path, *args: str, ranks: int = 1, fault: str = "", probe: Path | None = None,
          env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`gpt train --project PROJECT [--nproc RANKS] ARGS` in a fresh process, as a user runs it."""
    nproc = ("--nproc", str(ranks)) if ranks > 1 else ()
    return run_gpt("train", "--project", project, *nproc, *args, cwd=cwd,
                   env=train_env(ranks, fault, probe, env))


def trained(project: Path, *args: str, **options) -> Path:
    """train(), which must finish: the run dir."""
    result = train(project, *args, **options)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir(project)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, whose steps must be 1, 2, 3, ... once each."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    return lines


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


# --- the shards and the run the training tests share ---------------------------------------------------------


@pytest.fixture(scope="session")
def shards(tmp_path_factory, corpus) -> Path:
    """corpus in GPT-2 tokens, the last 20,000 of them the val split (shard_fixture.make_shards), written once
    per test process."""
    from shard_fixture import make_shards

    return make_shards(corpus, tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, shards) -> Path:
    """NANO_RUN uninterrupted, once per test process: checkpoints 3, 6 and 8, an evaluation at 4 and 8, RUN/model.
    The run every interrupted one must reproduce bit for bit. Read it, or copy it (copy_run); never write in it."""
    return trained(project_file(tmp_path_factory.mktemp("reference"), shards))


def copy_run(run_dir: Path, directory: Path, shards: Path, *overrides: str, name: str = "run") -> Path:
    """A copy of a finished NANO_RUN run dir in DIRECTORY/NAME, and the project (with `overrides`) that trains
    into it."""
    shutil.copytree(run_dir, directory / name)
    return project_file(directory, shards, *overrides, name=name)


def rewound_copy(run_dir: Path, destination: Path, step: int) -> Path:
    """A copy of a finished run dir as it stood right after saving step `step`: the later checkpoints and RUN/model
    gone, `latest` naming step's checkpoint; metrics.jsonl keeps the later steps, as a kill -9 leaves them (the
    resume drops them). Resuming it must give the finished run's losses bit for bit: the resume of a run killed
    after that save, without the run up to it and the kill (test_train.py kills real runs)."""
    shutil.copytree(run_dir, destination)
    tag = f"step_{step:08d}"
    checkpoints = destination / "checkpoints"
    assert (checkpoints / tag).is_dir(), sorted(p.name for p in checkpoints.iterdir())
    for later in checkpoints.glob("step_*"):
        if later.name > tag:
            shutil.rmtree(later)
    shutil.rmtree(destination / "model", ignore_errors=True)
    (checkpoints / "latest").write_text(tag + "\n")
    return destination


def private_null_device(directory: Path) -> Path:
    """A character device node of the null device inside the test's dir: a test of `--out /dev/null` must
    not aim at the machine's own /dev/null, which a broken implementation would replace for everyone."""
    path = directory / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path
