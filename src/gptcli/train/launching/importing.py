"""DeepSpeed, imported without what gptcli never runs of it.

DeepSpeed's import reaches its autotuner, which imports MLflow whenever MLflow is installed (for its own
logging of tuning experiments; gptcli never starts the autotuner): most of DeepSpeed's import time, in every
rank and every process that reads a checkpoint (docs/benchmarks.md, "DeepSpeed's import: without MLflow").
`import_deepspeed()` hides MLflow from that one import and gives it back at once: gptcli's MLflow tracker
imports it as usual, and the autotuner alone sees none. Every code path that may be the first in its process
to import DeepSpeed goes through here.

ZeRO's set-up, and every ZeRO-1/2 gradient reduction, import DeepSpeed's Muon module to ask whether the
optimizer is Muon, whatever it is. That module wraps its kernels in torch.compile as it loads, and the first
torch.compile of a process loads inductor: about a second of every rank's start (docs/benchmarks.md,
"DeepSpeed's Muon module: loaded uncompiled when unused"). `import_muon_uncompiled()` loads it with its
kernels left as they are, for a run whose optimizer is not DeepSpeed's Muon; one that is imported it already.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """The deepspeed module; its first import in this process runs without MLflow."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """DeepSpeed's Muon module, loaded now with its kernels not wrapped in torch.compile, unless this process
    has loaded it already (an optimizer built on it did, and keeps its compiled kernels). For a run whose
    optimizer is not DeepSpeed's Muon: DeepSpeed only asks isinstance of its class, and never runs a kernel.
    A Muon optimizer built later in the same process (one process, one run, except in tests) runs its kernels
    eagerly, as every CPU run does anyway (engine.initialize: nothing is compiled on the CPU by default)."""
    if DEEPSPEED_MUON in sys.modules:
        return
    from deepspeed.runtime import compiler

    original = getattr(compiler, "compile", None)
    if original is None:  # a DeepSpeed that compiles otherwise: its own import, as it is
        return
    compiler.compile = lambda *args, **kwargs: (lambda function: function)
    try:
        importlib.import_module(DEEPSPEED_MUON)
    except ImportError:
        pass  # DeepSpeed imports it under try itself, or not at all
    finally:
        compiler.compile = original
