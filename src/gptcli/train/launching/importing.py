"""DeepSpeed, imported without what gptcli never runs of it.

DeepSpeed's import reaches its autotuner, which imports MLflow whenever MLflow is installed (for its own
logging of tuning experiments; gptcli never starts the autotuner): most of DeepSpeed's import time, in every
rank and every process that reads a checkpoint (docs/benchmarks.md, "DeepSpeed's import: without MLflow").
`import_deepspeed()` hides MLflow from that one import and gives it back at once: gptcli's MLflow tracker
imports it as usual, and the autotuner alone sees none. Every code path that may be the first in its process
to import DeepSpeed goes through here.
"""

from __future__ import annotations

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
