"""An optimizer plugin: SGD with momentum and decoupled weight decay.

    buffer ← momentum · buffer + gradient          (the first step: buffer = gradient)
    update = gradient + momentum · buffer          with nesterov = true, else buffer
    weight ← weight · (1 − lr · weight_decay) − lr · update

Decay is decoupled from the gradient (Loshchilov & Hutter 2019), as in AdamW, and applies to the blocks' 2-D
weights and an untied lm_head only: not to the embeddings (wte, wpe), biases or LayerNorms.

Used as `[train] optimizer = "example_optimizer"` once this package is installed, or without installing it
as `optimizer = "optimizer.py:OPTIMIZER"` with this file beside the project file. It reads [train] lr and
weight_decay, and its own `[train] optimizer_options = { momentum = 0.9, nesterov = false }`.

The module imports no torch: the planner and the schema read the spec before anything heavy is loaded, and
the optimizer class is made the first time a run builds it.
"""

from __future__ import annotations

from functools import cache

from gptcli.optimizers import FP32, OptimizerSpec, Option, ParameterGroup


def decayed(name: str, shape: tuple[int, ...]) -> bool:
    """The blocks' weight matrices (h.N.attn.*, h.N.mlp.*) and an untied lm_head; not wte or wpe."""
    return len(shape) >= 2 and not name.startswith(("wte.", "wpe."))


def groups(parameters, train) -> list[ParameterGroup]:
    """(name, shape) of every parameter → a decayed group and an undecayed one."""
    return [ParameterGroup(tuple(name for name, shape in parameters if decayed(name, shape)),
                           {"weight_decay": train.weight_decay}),
            ParameterGroup(tuple(name for name, shape in parameters if not decayed(name, shape)),
                           {"weight_decay": 0.0})]


@cache
def momentum_sgd():
    """The torch optimizer class, made once, when a run first builds it."""
    import torch

    class MomentumSGD(torch.optim.Optimizer):
        def __init__(self, params, lr: float, momentum: float, nesterov: bool, weight_decay: float = 0.0):
            super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            loss = None if closure is None else closure()
            for group in self.param_groups:
                lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
                for weight in group["params"]:
                    if weight.grad is None:
                        continue
                    gradient = weight.grad
                    state = self.state[weight]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = gradient.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(gradient)
                    buffer = state["momentum_buffer"]
                    update = gradient.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                    if decay:
                        weight.mul_(1 - lr * decay)
                    weight.add_(update, alpha=-lr)
            return loss

    return MomentumSGD


def build(parameter_groups: list[dict], train, placement):
    """The optimizer over torch's parameter groups; it runs wherever the tensors are (GPU, CPU, offloaded)."""
    options = OPTIMIZER.option_values(train)
    return momentum_sgd()(parameter_groups, lr=train.lr, momentum=options["momentum"], nesterov=options["nesterov"])


OPTIMIZER = OptimizerSpec(
    name="example_optimizer", title="SGD with momentum",
    description="SGD with momentum (optionally Nesterov's) and decoupled weight decay on the blocks' matrices",
    state_bytes=FP32,  # one fp32 momentum buffer per parameter
    group=groups, build=build,
    train_keys=("lr", "weight_decay"),
    options={"momentum": Option(0.9, "Momentum coefficient of the buffer.", at_least=0, below=1),
             "nesterov": Option(False, "Step along gradient + momentum · buffer (Nesterov) instead of the buffer.")},
    state_keys=("momentum_buffer",),
    step_temporary_bytes=lambda placement: FP32,  # nesterov's update, one fp32 tensor the size of a weight
)
