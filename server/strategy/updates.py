"""The three update kinds in one place: how a round's combined update becomes the next global state.

Workers answer with one kind of update (``TrainingPlan.update``):

- ``weights``: the trained model (parameters and buffers);
- ``delta``: trained minus received for floating-point tensors; integer and bool buffers travel as values;
- ``gradients``: the gradient of the mean loss at the received weights (FedSGD), parameters only.

A strategy first combines the round's updates in that same representation (weighted mean, median, Krum's pick)
and then turns the result into the next global state with one of two rules:

- :func:`to_global` (FedAvg, the robust strategies): weights are the new model as they are, a delta is added to
  the global model, a gradient is applied by :class:`ServerSGD`.
- :func:`apply_pseudo_gradient` (the server optimizers of :mod:`.serveropt`): the combined update becomes the
  pseudo-gradient ``Δ``, the direction the workers moved the model (``combined - global``, the delta itself, or
  ``-gradient``), the strategy maps ``Δ`` to a step, and the new model is ``global + step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedlink.protocol.messages import UpdateKind
from fedlink.protocol.tensors import State

from ..aggregate import WeightedSum, accumulator_dtype, add_into, add_scaled
from .base import Aggregation, ClientUpdate, check_float

__all__ = ["same_kind", "MeanAggregation", "ServerSGD", "to_global", "apply_pseudo_gradient", "load_tensor_groups"]


def same_kind(seen: UpdateKind | None, update: ClientUpdate) -> UpdateKind:
    """The round's update kind; every update of a round must have the same."""
    if seen is not None and update.kind != seen:
        raise ValueError(f"mixed update kinds in one round: {seen} and {update.kind}")
    return update.kind


class MeanAggregation(Aggregation):
    """The sample-weighted mean, folded one update at a time: one accumulator, however many workers answer.

    ``finish`` hands ``(kind, global_state, mean)`` to the strategy's callback, which returns the next state.
    """

    def __init__(self, global_state: State, finish: Callable[[UpdateKind, State, State], State]) -> None:
        self._global = global_state
        self._finish = finish
        self._sum = WeightedSum()
        self._kind: UpdateKind | None = None

    def add(self, update: ClientUpdate) -> None:
        self._kind = same_kind(self._kind, update)
        self._sum.add(update.state, float(update.num_samples))

    def finish(self) -> State:
        mean = self._sum.mean()  # raises on an empty round
        assert self._kind is not None
        return self._finish(self._kind, self._global, mean)


class ServerSGD:
    """The server's SGD step for ``gradients`` updates: ``global - lr * v``, ``v = momentum * v + g``.

    With ``momentum`` 0 this is plain FedSGD (McMahan et al. 2017). The velocity is the only cross-round state;
    it is replaced, never modified in place, so a :meth:`state_dict` snapshot stays valid.
    """

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr = check_float("server_lr", lr, low=0, low_open=True)
        self.momentum = check_float("server_momentum", momentum, low=0, high=1)
        self._velocity: dict[str, torch.Tensor] = {}

    def step(self, global_state: State, gradient: Mapping[str, torch.Tensor]) -> State:
        """One step on the tensors the gradient covers (parameters); the others (buffers) stay as they are."""
        step: dict[str, torch.Tensor] = {}
        for name, grad in gradient.items():
            if self.momentum:
                velocity = self._velocity.get(name)
                velocity = grad.clone() if velocity is None else velocity * self.momentum + grad
                self._velocity[name] = velocity
                grad = velocity
            step[name] = grad
        return add_scaled(global_state, step, -self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self._velocity)} if self._velocity else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._velocity = load_tensor_groups(state, ("velocity",), owner="server SGD").get("velocity", {})


def to_global(kind: UpdateKind, global_state: State, combined: State, sgd: ServerSGD, *, owned: bool = False) -> State:
    """FedAvg's rule: the combined update, in the workers' representation, as the next global state. With
    ``owned`` (a fresh mean no one else holds) a delta is added into the combined update's own tensors."""
    if kind == "weights":
        return combined
    if kind == "delta":
        return add_into(combined, global_state) if owned else add_scaled(global_state, combined)
    if kind == "gradients":
        return sgd.step(global_state, combined)
    raise ValueError(f"unknown update kind {kind!r}")


def apply_pseudo_gradient(
    kind: UpdateKind,
    global_state: State,
    combined: dict[str, torch.Tensor],
    step: Callable[[str, torch.Tensor], torch.Tensor],
) -> State:
    """``global + step(name, Δ)`` for each floating-point tensor the update covers, ``Δ`` being the pseudo-gradient.

    ``Δ`` is ``combined - global`` for weights, ``combined`` for a delta and ``-combined`` for gradients, computed
    in accumulator precision (float32 for half types); ``step`` returns the change in that dtype, as a tensor no one
    else keeps: a new one, or ``Δ`` itself changed in place (``Δ`` belongs to this function). The global value is
    added into that tensor (the same bits as ``global + change``: addition is commutative), so a strategy's step
    costs no tensor of its own. Integer and bool tensors take the combined value; tensors the update lacks
    (buffers under ``gradients``) stay. Takes ownership of ``combined`` and empties it as it goes, so memory
    holds about one extra tensor at a time.
    """
    if kind not in ("weights", "delta", "gradients"):
        raise ValueError(f"unknown update kind {kind!r}")
    out: dict[str, torch.Tensor] = {}
    for name, base in global_state.items():
        value = combined.pop(name, None)
        if value is None:
            out[name] = base
        elif not base.is_floating_point():
            out[name] = value.to(base.dtype)
        else:
            acc = accumulator_dtype(base.dtype)
            if kind == "weights":
                delta = value.to(acc) - base.to(acc)
            elif kind == "delta":
                delta = value.to(acc)
            else:
                delta = -value.to(acc)
            out[name] = step(name, delta).add_(base.to(acc)).to(base.dtype)
    return out


def load_tensor_groups(
    state: Mapping[str, Any], groups: tuple[str, ...], *, owner: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Check a saved ``{group: {tensor name: tensor}}`` state and return shallow copies of its groups."""
    unknown = sorted(set(state) - set(groups))
    if unknown:
        raise ValueError(f"{owner}: unexpected state keys {unknown}; expected some of {list(groups)}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, tensors in state.items():
        if not isinstance(tensors, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{owner}: state[{group!r}] must map tensor names to tensors")
        out[group] = dict(tensors)
    return out
