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
    where it runs       the settings it cannot train in (one sentence each, said before anything slow), and
                        the DeepSpeed config keys it needs where it does

This module is torch-free at import: the planner (arithmetic only) reads the bytes, the schema the options;
only a builder imports torch, and DeepSpeed's kernels, inside the function, when a run builds its optimizer
(train/engine.py). ADAMW is the built-in "adamw", MUON the built-in "muon".
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
    memory and DeepSpeed runs the step there (deepspeed.offload_optimizer); `zero_stage` and `precision`
    (fp32, bf16, fp16): which of DeepSpeed's optimizer wrappers drives it."""

    device: str
    offload: bool = False
    zero_stage: int = 0
    precision: str = "fp32"


@dataclass(frozen=True)
class ParameterGroup:
    """One optimizer parameter group: the parameters' names, in the model's order, and the group's settings,
    passed to the optimizer with the tensors (`weight_decay`; `lr_scale` multiplies the schedule's
    learning rate for this group; anything else the spec's own optimizer reads)."""

    names: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""  # what the plan's split calls it ("Muon"); groups without one are not listed
    state_bytes: Optional[int] = None  # its state per parameter where it differs from the spec's state_bytes
    whole_matrices: bool = False  # its step works on each whole matrix, whatever ZeRO partitions (the planner
    # counts the spec's matrix_temporary_bytes on the largest)


@dataclass(frozen=True)
class Option:
    """One key of `[train] optimizer_options` a spec accepts: its default, one line of doc, its range."""

    default: Any
    doc: str
    at_least: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    at_most: Optional[float] = None
    choices: tuple = ()  # the values a string option may take (none: any)

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
        if self.choices and value not in self.choices:
            raise GptError(f"{where} must be one of {', '.join(map(repr, self.choices))}, not {value!r}.")
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


def no_settings(placement: Placement) -> dict:
    return {}


def trains_anywhere(train, placement: Placement) -> Optional[str]:
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as gptcli knows it (the module doc says what each part is for).

    group(parameters, train) → [ParameterGroup]: every parameter (name, shape) in exactly one group.
    build(groups, train, placement) → a torch.optim.Optimizer: `groups` are torch's parameter groups
    ({"params": [tensors], **options}); `train` the [train] section; `placement` where it runs.
    step_temporary_bytes(placement) → bytes per element of the tensor its step updates at once (a
    per-tensor loop: the largest tensor at ZeRO-0, this rank's flat partition at ZeRO 1-3).
    matrix_temporary_bytes(placement) → bytes per element of the largest matrix of a `whole_matrices` group,
    allocated while its step works on that matrix.
    deepspeed_settings(placement) → DeepSpeed config keys it needs there ([deepspeed] config overrides them).
    unsupported(train, placement) → the sentence that refuses a setting it cannot train in, or None."""

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
    matrix_temporary_bytes: Callable[[Placement], int] = no_temporaries
    deepspeed_settings: Callable[[Placement], dict] = no_settings
    unsupported: Callable[[Any, Placement], Optional[str]] = trains_anywhere

    @property
    def shown(self) -> str:
        """The name the plan's words use."""
        return self.title or self.name

    def group_state_bytes(self, group: ParameterGroup) -> int:
        """Bytes of state per parameter of `group`: its own figure, else the spec's."""
        return self.state_bytes if group.state_bytes is None else group.state_bytes

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
    """AdamW over the groups, with [train] lr, beta1, beta2 and eps, on the kernel adam_kernel picks."""
    kernel, mode = adam_kernel(placement)
    return kernel(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, **mode)


def adam_kernel(placement: Placement) -> tuple[Any, dict]:
    """The AdamW class for where it runs, and the keywords that put it in AdamW's mode. DeepSpeed's CPU Adam
    when the state is offloaded; on a GPU DeepSpeed's FusedAdam when it was built into the installed
    DeepSpeed, else torch's fused AdamW (never a JIT build of FusedAdam: minutes of nvcc, and a hang on a
    build lock a killed run left behind); on the CPU torch's single-tensor AdamW (deterministic element by
    element, so resume is exact)."""
    import torch

    if placement.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam, {"adamw_mode": True}
    if placement.device == "cuda":
        if fused_adam_prebuilt():
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam, {"adam_w_mode": True}
        return torch.optim.AdamW, {"fused": True}
    return torch.optim.AdamW, {"foreach": False}


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


# --- Muon ------------------------------------------------------------------------------------------------------
#
# Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): SGD momentum whose update of a weight matrix is
# replaced by the nearest semi-orthogonal matrix, computed by a Newton–Schulz iteration. The optimizer of every
# GPT-2 speedrun record since October 2024 (github.com/KellerJordan/modded-nanogpt) for the hidden matrices,
# with AdamW for the rest. gptcli runs DeepSpeed's implementation (deepspeed/runtime/zero/muon/), which works
# inside each of its ZeRO optimizers, and tags every parameter itself (`use_muon`): DeepSpeed's own tagging
# (for an optimizer named in its config, which gptcli never does) would send wte and a tied head to Muon.

MUON_NS_METHODS = ("gram", "standard")


def orthogonalised(name: str, shape: tuple[int, ...]) -> bool:
    """Muon's share: the 2-D weight matrices inside the blocks (h.N.attn.c_attn, attn.c_proj, mlp.c_fc,
    mlp.c_proj). Not wte (nor the head tied to it, nor an untied lm_head), wpe, the norms' gains or the
    biases: the Muon README keeps embeddings, the classifier head, gains and biases on AdamW."""
    return name.startswith("h.") and len(shape) == 2


def muon_groups(parameters: Sequence[NamedShape], train) -> list[ParameterGroup]:
    """Muon on the blocks' matrices; AdamW as "adamw" groups the rest (decay on wte and an untied lm_head,
    none on wpe, norms, biases). The matrices are listed largest first, the order DeepSpeed's
    MuonWithAuxAdam sorts them into (a stable sort by shape), so that the names a checkpoint records are
    those of the optimizer's own order."""
    options = MUON.option_values(train)
    shapes = dict(parameters)
    matrices = sorted((name for name, shape in parameters if orthogonalised(name, shape)), key=shapes.__getitem__,
                      reverse=True)
    rest = [(name, shape) for name, shape in parameters if not orthogonalised(name, shape)]
    muon = ParameterGroup(tuple(matrices), {
        "use_muon": True, "lr_scale": options["lr"] / train.lr, "momentum": options["momentum"],
        "weight_decay": options["weight_decay"], "ns_method": options["ns_method"]},
        label="Muon", state_bytes=FP32, whole_matrices=True)  # one fp32 momentum buffer per parameter
    decayed, plain = adamw_groups(rest, train)
    groups = [muon, ParameterGroup(decayed.names, {"use_muon": False, **decayed.options}, label="AdamW"),
              ParameterGroup(plain.names, {"use_muon": False, **plain.options}, label="AdamW, no decay")]
    return [group for group in groups if group.names]  # DeepSpeed drops an empty group; so does the record


def build_muon(groups: list[dict], train, placement: Placement):
    """DeepSpeed's MuonWithAuxAdam over the groups, its AdamW half on adam_kernel's AdamW. Every tensor is
    tagged `use_muon` as its group says: DeepSpeed's ZeRO optimizers read the tag to orthogonalise a
    matrix's gradient while they flatten it into a partition (ZeRO 1-2), in BF16_Optimizer's step, or in
    ZeRO-3's sub-group loop; at ZeRO-0 MuonWithAuxAdam's own step runs Newton–Schulz on the matrix."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    kernel, mode = adam_kernel(placement)
    for group in groups:
        for tensor in group["params"]:
            tensor.use_muon = group["use_muon"]
        group["lr"] = train.lr * group.get("lr_scale", 1.0)  # the loop sets it again at every step
        if not group["use_muon"]:
            group.update(betas=(train.beta1, train.beta2), eps=train.eps)
    return MuonWithAuxAdam(groups, adam_optimizer=kernel, adam_optimizer_kwargs=mode, adam_w_mode=True)


def muon_settings(placement: Placement) -> dict:
    """ZeRO-3 runs Muon only without its reduce-scatter of gradients (deepspeed/runtime/zero/stage3.py
    refuses the two together); Muon needs each matrix's whole gradient there."""
    return {"zero_optimization": {"reduce_scatter": False}} if placement.zero_stage == 3 else {}


def clips_muon_updates(placement: Placement) -> bool:
    """Whether DeepSpeed takes the gradient norm after Muon's orthogonalisation, and so clips the updates:
    its ZeRO optimizer at stages 1-2 (DeepSpeedZeroOptimizer orthogonalises while it flattens the gradient
    partitions, offloaded or not) and ZeRO-3 (before its norm). At ZeRO-0 (the loop, or DeepSpeed's fp16/bf16
    wrapper, clips the gradients, then the step runs Muon) and in BF16_Optimizer (bf16 at ZeRO-1, which clips
    first) the gradients are clipped."""
    bf16_optimizer = placement.precision == "bf16" and placement.zero_stage == 1 and not placement.offload
    return placement.zero_stage > 0 and not bf16_optimizer


def muon_unsupported(train, placement: Placement) -> Optional[str]:
    """Clipping where DeepSpeed would clip Muon's updates, not the gradients: a matrix's orthogonalised update
    has a norm of about the square root of its smaller side (27.7 for GPT-2's 768), so train.grad_clip = 1
    would divide every step, AdamW's too, by that norm over all matrices."""
    if train.grad_clip == 0 or not clips_muon_updates(placement):
        return None
    fixes = "deepspeed.zero_stage = 0" + (", or 1 with bf16 on a GPU," if placement.device == "cuda" else "")
    return (f'train.optimizer = "muon" cannot clip gradients at deepspeed.zero_stage = {placement.zero_stage} with '
            f"{placement.precision}{' and offload_optimizer' if placement.offload else ''}: DeepSpeed takes the norm "
            "there after Muon has orthogonalised the matrices' gradients, so train.grad_clip would shrink Muon's "
            f"updates, not the gradients; set train.grad_clip = 0 (the Muon recipe does not clip), or {fixes} where "
            "the gradients are clipped before Muon.")


def muon_temporaries(placement: Placement) -> int:
    """Newton–Schulz on one matrix at a time: 3 fp32 copies of a 3072 × 768 matrix at the peak with the Gram
    iteration (2.25 with the standard one; 6 of a square 768 × 768 one, 1.5 of the larger; measured on the
    CPU with torch's memory timeline), counted as 4. On a GPU the iteration runs in fp16 or bf16."""
    return 4 * FP32


MUON = OptimizerSpec(
    name="muon", title="Muon + AdamW",
    description="Muon (Jordan et al. 2024) on the blocks' weight matrices, AdamW on embeddings, head, norms "
                "and biases; DeepSpeed's MuonWithAuxAdam",
    state_bytes=2 * FP32,  # AdamW's two moments on its share; the Muon group says its own (one momentum buffer)
    group=muon_groups, build=build_muon,
    train_keys=("lr", "beta1", "beta2", "eps", "weight_decay"),
    options={
        "lr": Option(0.02, "Muon's peak learning rate; the schedule shapes it as it shapes train.lr, which "
                           "AdamW's share keeps (0.02: the Muon README, github.com/KellerJordan/Muon).", above=0),
        "momentum": Option(0.95, "Muon's momentum, Nesterov's form (0.95: the Muon README).", at_least=0, below=1),
        "weight_decay": Option(0.01, "Decoupled weight decay on Muon's matrices; train.weight_decay stays "
                                     "AdamW's (0.01: the Muon README's example).", at_least=0),
        "ns_method": Option("gram", 'How the five steps of Newton–Schulz are computed (DeepSpeed fixes five): "gram" '
                                    "on the smaller Gram matrix (DeepSpeed's default, fewer FLOPs on rectangular "
                                    'matrices), "standard" as the Muon README writes it; the same quintic '
                                    "(3.4445, -4.7750, 2.0315).", choices=MUON_NS_METHODS),
    },
    state_keys=("momentum_buffer", "exp_avg", "exp_avg_sq"), step_key="step",
    step_temporary_bytes=adamw_temporaries, matrix_temporary_bytes=muon_temporaries,
    deepspeed_settings=muon_settings, unsupported=muon_unsupported,
)
