"""FedAvg: the sample-weighted mean of the workers' models.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017. For ``delta`` updates the mean delta is added to the global model; for
``gradients`` (FedSGD, same paper) the mean gradient is applied by a server-side SGD step with ``server_lr`` and
optional ``server_momentum``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlink.protocol.tensors import State

from ..aggregate import WeightedSum, add_scaled
from .base import Aggregation, ClientUpdate, Strategy

__all__ = ["FedAvg"]


class _FedAvgRound(Aggregation):
    def __init__(self, strategy: "FedAvg", global_state: State) -> None:
        self._strategy = strategy
        self._global = global_state
        self._sum = WeightedSum()
        self._kind: str | None = None

    def add(self, update: ClientUpdate) -> None:
        if self._kind is None:
            self._kind = update.kind
        elif update.kind != self._kind:
            raise ValueError(f"mixed update kinds in one round: {self._kind} and {update.kind}")
        self._sum.add(update.state, float(update.num_samples))

    def finish(self) -> State:
        mean = self._sum.mean()
        if self._kind == "weights":
            return mean
        if self._kind == "delta":
            return add_scaled(self._global, mean)
        return self._strategy.apply_gradient(self._global, mean)


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr must be positive, got {server_lr}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self._velocity: dict[str, torch.Tensor] = {}

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        return _FedAvgRound(self, global_state)

    def apply_gradient(self, global_state: State, gradient: State) -> State:
        """One SGD step (with heavy-ball momentum if set) on the parameters the gradient covers."""
        step: dict[str, torch.Tensor] = {}
        for name, grad in gradient.items():
            if self.server_momentum:
                velocity = self._velocity.get(name)
                velocity = grad.clone() if velocity is None else velocity.mul_(self.server_momentum).add_(grad)
                self._velocity[name] = velocity
                grad = velocity
            step[name] = grad
        return add_scaled(global_state, step, -self.server_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self._velocity)} if self._velocity else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._velocity = dict(state.get("velocity", {}))
