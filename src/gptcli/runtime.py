"""What `gpt generate` and `gpt eval` share before they start: the device to run on and the model to
run, from `--device` and `--checkpoint` or the project's run dir."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import GptError, UsageError

if TYPE_CHECKING:  # torch is imported when a device is resolved, not when the CLI starts
    import torch

    from .config import Project
    from .modeldir import LoadedModel

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> "torch.device":
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`; asking for CUDA where there is none is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r} ({DEVICE_CHOICES}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptError(f"--device {name} asks for CUDA, but no CUDA device is available here.")
    return device


def load_project_model(project: "Project", checkpoint: Optional[Path], device: "torch.device") -> "LoadedModel":
    """The model of `checkpoint` (a model dir or a run dir), else of the project's run dir (RUN/model)."""
    from .modeldir import load_model_dir

    if checkpoint is None:
        run_dir = Path(project.project.out_dir)
        if not run_dir.exists():
            raise GptError(f"No --checkpoint given and the project's run dir {run_dir} does not exist; pass "
                           "--checkpoint MODEL_DIR (a model dir or a run dir) or train the project first.")
        checkpoint = run_dir
    return load_model_dir(checkpoint, device=device)
