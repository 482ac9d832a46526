"""FedAvg: the sample-weighted mean of the workers' models.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017. For ``delta`` updates the mean delta is added to the global model; for
``gradients`` (FedSGD, same paper) the mean gradient is applied by a server-side SGD step with ``server_lr`` and
optional ``server_momentum``. Streaming: one running sum, whatever the number of workers.
"""

from __future__ import annotations

from typing import Any

from fedlink.protocol.messages import UpdateKind
from fedlink.protocol.tensors import State

from .base import Aggregation, Strategy
from .updates import MeanAggregation, ServerSGD, to_global

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        self._sgd = ServerSGD(lr=server_lr, momentum=server_momentum)

    @property
    def server_lr(self) -> float:
        return self._sgd.lr

    @property
    def server_momentum(self) -> float:
        return self._sgd.momentum

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        return MeanAggregation(global_state, self._finish)

    def _finish(self, kind: UpdateKind, global_state: State, mean: State) -> State:
        return to_global(kind, global_state, mean, self._sgd, owned=True)  # the round's own fresh mean

    def apply_gradient(self, global_state: State, gradient: State) -> State:
        """One SGD step (with heavy-ball momentum if set) on the parameters the gradient covers."""
        return self._sgd.step(global_state, gradient)

    def state_dict(self) -> dict[str, Any]:
        return self._sgd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sgd.load_state_dict(state)
