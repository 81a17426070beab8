"""DeepSpeed, imported without what gptcli never runs of it.

DeepSpeed's import reaches its autotuner, which imports MLflow whenever MLflow is installed (for its own
logging of tuning experiments; gptcli never starts the autotuner). That import is about 2 s of every rank's
start and of every process that reads a checkpoint. `import_deepspeed()` hides MLflow from that one import
and gives it back at once: gptcli's MLflow tracker imports it as usual, and the autotuner alone sees none.
Every code path that may be the first in its process to import DeepSpeed goes through here.
"""

from __future__ import annotations

import sys
from types import ModuleType

# What DeepSpeed imports at its own import only for features gptcli does not use.
UNUSED_AT_IMPORT = ("mlflow",)


def import_deepspeed() -> ModuleType:
    """The deepspeed module, its first import in this process without UNUSED_AT_IMPORT."""
    if "deepspeed" not in sys.modules:
        hidden = [name for name in UNUSED_AT_IMPORT if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
        try:
            import deepspeed  # noqa: F401
        finally:
            for name in hidden:
                if sys.modules.get(name, ModuleType(name)) is None:
                    del sys.modules[name]
    import deepspeed

    return deepspeed
