"""SCAFFOLD's control variates: the tensor names both sides agree on, and the worker's option-II update. No I/O.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1. The server keeps a control variate ``c`` and every worker its own ``c_i``, one
tensor per floating-point model parameter. A worker corrects each local gradient to ``g + c - c_i`` and, after
its ``K`` local steps from ``x`` to ``y`` with learning rate ``lr``, sets (option II)

    c_i+ = c_i - c + (x - y) / (K * lr)

and sends ``Δc_i = c_i+ - c_i`` with its model update. The server's ``c`` travels to the workers beside the
global model as ``scaffold/c/<parameter>``; ``Δc_i`` comes back beside the update as ``scaffold/delta_c/<parameter>``.
Both are plain tensors of the state, declared in advance by the worker's ``scaffold`` training hook
(:meth:`fedlink.hooks.TrainingHook.inputs`) and by the coordinator's strategy (the update header), so they are
checked for names, shapes and dtypes before a byte moves, like the model's own tensors.

With heavy-ball momentum ``m`` the local optimizer moves about ``lr / (1 - m)`` per unit of gradient once the
momentum has built up; option II then divides by that effective rate (the paper uses plain SGD, ``m = 0``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlink.protocol.tensors import StateHeader, TensorSpec

__all__ = [
    "PREFIX",
    "CONTROL",
    "DELTA",
    "control_name",
    "delta_name",
    "control_specs",
    "delta_specs",
    "effective_lr",
    "option_ii",
]

PREFIX = "scaffold/"
CONTROL = PREFIX + "c/"  # the server's c, sent with the global state
DELTA = PREFIX + "delta_c/"  # a worker's Δc_i, sent back with its update


def control_name(parameter: str) -> str:
    return CONTROL + parameter


def delta_name(parameter: str) -> str:
    return DELTA + parameter


def _floating(parameters: StateHeader) -> list[TensorSpec]:
    return [t for t in parameters.tensors if t.dtype.startswith(("float", "bfloat"))]


def control_specs(parameters: StateHeader) -> tuple[TensorSpec, ...]:
    """The ``scaffold/c/...`` tensors that travel with the global state, for a model with these parameters."""
    return tuple(t.model_copy(update={"name": control_name(t.name)}) for t in _floating(parameters))


def delta_specs(parameters: StateHeader) -> tuple[TensorSpec, ...]:
    """The ``scaffold/delta_c/...`` tensors that travel back with each update."""
    return tuple(t.model_copy(update={"name": delta_name(t.name)}) for t in _floating(parameters))


def effective_lr(lr: float, momentum: float) -> float:
    """The step per unit of gradient of SGD with heavy-ball ``momentum``, once it has built up."""
    if not (lr > 0 and 0 <= momentum < 1):
        raise ValueError(f"lr must be > 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
    return lr / (1 - momentum)


def option_ii(
    c_i: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """``c_i+ = c_i - c + (start - end) / (steps * lr)`` per parameter (new tensors; the inputs are not changed)."""
    if steps < 1:
        raise ValueError(f"option II needs at least one local step, got {steps}")
    scale = 1.0 / (steps * lr)
    return {name: c_i[name] - c[name] + (start[name] - end[name]) * scale for name in c_i}
