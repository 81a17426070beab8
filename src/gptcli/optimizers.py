"""Optimizers as specs: what the planner, the engine, a resume and the probes need to know of an optimizer,
in one object per optimizer. `train.optimizer` names one through `registry.OPTIMIZERS` (docs/extending.md).

A spec says
    what it is          name, a one-line description, the title the plan's words use ("AdamW")
    what it keeps       its state in bytes per parameter it updates (AdamW: two fp32 moments, 8); the planner
                        adds the fp32 master weights of mixed precision itself
    its step's extra    bytes per element of the tensor its step updates at once, allocated for the step
    what it reads       the [train] keys it uses, and its own keys in `[train] optimizer_options`, each with a
                        default, a doc line and a range, checked when the project loads
    its grouping        from (name, shape) of each parameter: the parameter groups, each with its settings
                        (weight decay; `lr_scale`, a factor on the schedule's learning rate; for an optimizer
                        made of two, which one updates the group)
    its builder         the torch optimizer over the grouped tensors, for where it runs (device, offload)
    its state's keys    the per-parameter tensors it keeps (what the probes read, what a resume on another
                        number of ranks must carry), and its step counter, if it keeps one per parameter

This module is torch-free at import: the planner (arithmetic only) reads the bytes, the schema the options;
only a builder imports torch, and DeepSpeed's kernels, inside the function, when a run builds its optimizer
(train/engine.py). ADAMW is the built-in "adamw".
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import GptError
from .registry import OPTIMIZERS

FP32 = 4  # bytes

# One parameter as a grouping rule sees it: its state-dict name and its shape.
NamedShape = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class Placement:
    """Where the optimizer runs: `device` "cuda" or "cpu"; `offload`: ZeRO-Offload keeps its state in CPU
    memory and DeepSpeed runs the step there (deepspeed.offload_optimizer)."""

    device: str
    offload: bool = False


@dataclass(frozen=True)
class ParameterGroup:
    """One optimizer parameter group: the parameters' names, in the model's order, and the group's settings,
    passed to the optimizer with the tensors (`weight_decay`; `lr_scale` multiplies the schedule's
    learning rate for this group; anything else the spec's own optimizer reads)."""

    names: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One key of `[train] optimizer_options` a spec accepts: its default, one line of doc, its range."""

    default: Any
    doc: str
    at_least: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    at_most: Optional[float] = None

    def check(self, where: str, value: Any) -> Any:
        """`value` in the default's type (an int where a float is expected becomes one), inside the range;
        else one GptError sentence naming `where`."""
        expected = type(self.default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise GptError(f"{where} must be {TYPE_WORDS.get(expected, expected.__name__)}, not {value!r}.")
        if expected is float and not math.isfinite(value):
            raise GptError(f"{where} must be a finite number, not {value}.")
        if expected in (int, float) and not self.in_range(value):
            raise GptError(f"{where} must be {self.range_words()}, not {value}.")
        return value

    def in_range(self, value: float) -> bool:
        return ((self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.below is None or value < self.below) and (self.at_most is None or value <= self.at_most))

    def range_words(self) -> str:
        parts = [f"{word} {bound:g}" for word, bound in (("at least", self.at_least), ("more than", self.above),
                                                         ("less than", self.below), ("at most", self.at_most))
                 if bound is not None]
        return " and ".join(parts) or "any value"


TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def no_temporaries(placement: Placement) -> int:
    return 0


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as gptcli knows it (the module doc says what each part is for).

    group(parameters, train) → [ParameterGroup]: every parameter (name, shape) in exactly one group.
    build(groups, train, placement) → a torch.optim.Optimizer: `groups` are torch's parameter groups
    ({"params": [tensors], **options}); `train` the [train] section; `placement` where it runs.
    step_temporary_bytes(placement) → bytes per element of the tensor its step updates at once (a
    per-tensor loop: the largest tensor at ZeRO-0, this rank's flat partition at ZeRO 1-3)."""

    name: str
    description: str
    state_bytes: int
    group: Callable[[Sequence[NamedShape], Any], list[ParameterGroup]]
    build: Callable[[list[dict], Any, Placement], Any]
    title: str = ""
    train_keys: tuple[str, ...] = ("lr",)
    options: Mapping[str, Option] = field(default_factory=dict)
    state_keys: tuple[str, ...] = ()
    step_key: Optional[str] = None
    step_temporary_bytes: Callable[[Placement], int] = no_temporaries

    @property
    def shown(self) -> str:
        """The name the plan's words use."""
        return self.title or self.name

    def option_values(self, train) -> dict[str, Any]:
        """Its options with `[train] optimizer_options` over their defaults (checked: check_options)."""
        given = self.check_options(getattr(train, "optimizer_options", {}) or {})
        return {key: given.get(key, option.default) for key, option in self.options.items()}

    def check_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`[train] optimizer_options` against the options this spec declares; one sentence for an unknown
        key (with the nearest), a wrong type or a value out of range."""
        checked = {}
        for key, value in given.items():
            where = f"train.optimizer_options.{key}"
            if key not in self.options:
                known = ", ".join(self.options) or "none"
                close = difflib.get_close_matches(key, list(self.options), n=1, cutoff=0.5)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise GptError(f'{where} is not an option of the optimizer "{self.name}" (its options: {known}; '
                               f"it also reads [train] {', '.join(self.train_keys)}){hint}.")
            checked[key] = self.options[key].check(where, value)
        return checked


def optimizer_spec(value: str, where: str = "train.optimizer") -> OptimizerSpec:
    """The spec `value` names (a registered name or a reference: registry.OPTIMIZERS), or one sentence.
    File references arrive absolute (config.Project makes them so), so no base dir is needed here."""
    spec = OPTIMIZERS.resolve(value, where=where)
    if not isinstance(spec, OptimizerSpec):
        raise GptError(f'{where} = "{value}" names {type(spec).__name__} {spec!r:.60}, not an OptimizerSpec '
                       "(gptcli.optimizers.OptimizerSpec; docs/extending.md).")
    return spec


def grouped_names(spec: OptimizerSpec, parameters: Sequence[NamedShape], train) -> list[ParameterGroup]:
    """The spec's groups of `parameters`, checked: every parameter in exactly one group, no other name."""
    groups = spec.group(parameters, train)
    counts: dict[str, int] = {}
    for group in groups:
        for name in group.names:
            counts[name] = counts.get(name, 0) + 1
    expected = [name for name, _ in parameters]
    problems = [f"{name} {'in no group' if counts.get(name, 0) == 0 else 'in several groups'}"
                for name in expected if counts.get(name, 0) != 1]
    problems += [f"{name}, which the model does not have" for name in counts if name not in set(expected)]
    if problems:
        more = f" and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise GptError(f'The optimizer "{spec.name}" groups the parameters wrongly: {", ".join(problems[:6])}{more}.')
    return groups


# --- AdamW -----------------------------------------------------------------------------------------------------


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """Weight decay on the 2-D weight matrices (attention, MLP, wte = the tied lm_head, an untied lm_head)
    only; biases, LayerNorm gains and the position embedding wpe are not decayed (as GPT-2 reproductions
    do: decay shrinks what multiplies activations, not offsets, scales or a position lookup)."""
    return len(shape) >= 2 and not name.startswith("wpe.")


def adamw_groups(parameters: Sequence[NamedShape], train) -> list[ParameterGroup]:
    """Two groups, decayed first (the order checkpoints were saved in): train.weight_decay and none."""
    decayed = tuple(name for name, shape in parameters if decays(name, shape))
    others = tuple(name for name, shape in parameters if not decays(name, shape))
    return [ParameterGroup(decayed, {"weight_decay": train.weight_decay}), ParameterGroup(others, {"weight_decay": 0.0})]


def build_adamw(groups: list[dict], train, placement: Placement):
    """DeepSpeed's CPU Adam when the state is offloaded; on a GPU DeepSpeed's FusedAdam when it was built
    into the installed DeepSpeed, else torch's fused AdamW (never a JIT build of FusedAdam: minutes of nvcc,
    and a hang on a build lock a killed run left behind); on the CPU torch's single-tensor AdamW
    (deterministic element by element, so resume is exact)."""
    import torch

    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    if placement.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if placement.device == "cuda":
        if fused_adam_prebuilt():
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def fused_adam_prebuilt() -> bool:
    """Whether DeepSpeed's FusedAdam loads without compiling: pip built it in (DS_BUILD_FUSED_ADAM=1) for
    this accelerator. The same test DeepSpeed's OpBuilder.load makes before it falls back to a JIT build."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    return bool(installed_ops.get("fused_adam")) and accelerator_name == get_accelerator()._name


def adamw_temporaries(placement: Placement) -> int:
    """None for the fused AdamW a GPU runs (torch's fused=True or DeepSpeed's FusedAdam) or DeepSpeed's CPU
    Adam; torch's single-tensor AdamW on the CPU makes two fp32 tensors the size of what it updates (sqrt
    of the variance, then its quotient; measured on the CPU, docs/planning.md)."""
    return 2 * FP32 if placement.device == "cpu" and not placement.offload else 0


ADAMW = OptimizerSpec(
    name="adamw", title="AdamW",
    description="AdamW (Loshchilov & Hutter 2019): Adam's moments with decoupled weight decay on 2-D weights",
    state_bytes=2 * FP32,  # exp_avg and exp_avg_sq, fp32, one of each per parameter
    group=adamw_groups, build=build_adamw,
    train_keys=("lr", "beta1", "beta2", "eps", "weight_decay"),
    state_keys=("exp_avg", "exp_avg_sq"), step_key="step",
    step_temporary_bytes=adamw_temporaries,
)
