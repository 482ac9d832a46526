"""Server optimizers: the round's mean update as a pseudo-gradient for an optimizer kept on the coordinator.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
frame FedAvg as SGD with learning rate 1 on the pseudo-gradient ``Δ`` (the mean of the workers' changes) and
replace it by other optimizers. :class:`ServerOptimizer` is that frame: it streams the sample-weighted mean like
FedAvg (memory: one accumulator), turns it into ``Δ`` (see :func:`.updates.apply_pseudo_gradient`: weights minus
global, the mean delta, or minus the mean gradient) and lets :meth:`ServerOptimizer.step` map each floating-point
tensor's ``Δ`` to its change. Integer and bool buffers take the averaged value.

:class:`AdaptiveOptimizer` is the paper's Algorithm 2, shared by FedAdagrad, FedAdam and FedYogi, which differ
only in how the second moment ``v`` is updated. The paper averages ``Δ`` uniformly over workers; here it is
weighted by samples, as in FedAvg.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch

from fedlink.protocol.messages import UpdateKind
from fedlink.protocol.tensors import State

from .base import Aggregation, Strategy, check_float
from .updates import MeanAggregation, apply_pseudo_gradient, load_tensor_groups

__all__ = ["ServerOptimizer", "AdaptiveOptimizer"]


class ServerOptimizer(Strategy):
    """Base of the strategies that run an optimizer on the pseudo-gradient; subclasses implement :meth:`step`.

    Per-tensor state lives in named groups (``moments``, e.g. ``("m", "v")``), read with :meth:`moment` and
    replaced, never modified in place, with :meth:`set_moment`; :meth:`state_dict` saves all of it.
    """

    moments: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._moments: dict[str, dict[str, torch.Tensor]] = {group: {} for group in self.moments}

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        return MeanAggregation(global_state, self._apply)

    def _apply(self, kind: UpdateKind, global_state: State, mean: State) -> State:
        return apply_pseudo_gradient(kind, global_state, mean, self.step)

    @abstractmethod
    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The change of tensor ``name`` for pseudo-gradient ``delta``, as a new tensor of ``delta``'s dtype
        that nothing else keeps (:func:`~.updates.apply_pseudo_gradient` adds the global value into it)."""

    def moment(self, group: str, name: str, like: torch.Tensor, initial: float) -> torch.Tensor:
        """Tensor ``name``'s value in ``group``, or ``initial`` everywhere before its first step."""
        value = self._moments[group].get(name)
        return torch.full_like(like, initial) if value is None else value

    def set_moment(self, group: str, name: str, value: torch.Tensor) -> None:
        self._moments[group][name] = value

    def state_dict(self) -> dict[str, Any]:
        if not any(self._moments.values()):
            return {}
        return {group: dict(tensors) for group, tensors in self._moments.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = load_tensor_groups(state, self.moments, owner=f"strategy {self.name!r}")
        self._moments = {group: loaded.get(group, {}) for group in self.moments}


class AdaptiveOptimizer(ServerOptimizer):
    """Algorithm 2 of Reddi et al.: ``x += eta * m / (sqrt(v) + tau)`` with ``m = beta1 * m + (1 - beta1) * Δ``.

    ``m`` starts at 0 and ``v`` at ``tau**2`` (the paper asks for ``v_{-1} >= tau**2``); there is no bias
    correction, as in the paper. Subclasses give :meth:`second_moment`. With ``beta1 = 0`` no ``m`` is stored.
    """

    moments = ("m", "v")

    def __init__(self, *, eta: float, beta1: float, tau: float, beta2: float | None = None) -> None:
        super().__init__()
        self.eta = check_float("eta", eta, low=0, low_open=True)
        self.beta1 = check_float("beta1", beta1, low=0, high=1)
        self.tau = check_float("tau", tau, low=0, low_open=True)
        self.beta2 = None if beta2 is None else check_float("beta2", beta2, low=0, high=1)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Δ_t``, as a new tensor."""

    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        if self.beta1:
            m = self.moment("m", name, delta, 0.0) * self.beta1 + delta * (1 - self.beta1)
            self.set_moment("m", name, m)
        else:
            m = delta
        v = self.second_moment(self.moment("v", name, delta, self.tau**2), delta)
        self.set_moment("v", name, v)
        return m * self.eta / (v.sqrt() + self.tau)
