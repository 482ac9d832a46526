"""Robust aggregation: strategies that must hold every update of a round in memory at once.

Memory note: FedAvg and the server optimizers fold each update into one running sum as it arrives. A median, a
trimmed mean or Krum's pairwise distances need all ``n`` updates side by side, so the coordinator holds ``n``
full copies of the model until the round ends (and, while combining, one stacked copy of the tensor at hand).
Budget ``n x model size`` of memory for these strategies; they are the documented exception to streaming.

Every rule here works on the update as the workers sent it: weights, deltas (the result is then added to the
global model) or gradients (the result then takes a server SGD step with ``server_lr`` and ``server_momentum``,
as in FedAvg); see :func:`.updates.to_global`. A worker's claimed sample count is bounded only by its shard size,
so median and trimmed mean ignore sample counts; Multi-Krum weights its selected updates by them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedlink.protocol.messages import UpdateKind
from fedlink.protocol.tensors import State

from .base import Aggregation, ClientUpdate, Strategy, TooFewUpdates
from .updates import ServerSGD, same_kind, to_global

__all__ = ["BufferedAggregation", "RobustStrategy"]


class BufferedAggregation(Aggregation):
    """Keeps every update of the round until :meth:`finish` (memory grows with the number of workers)."""

    def __init__(self, global_state: State, finish: Callable[[UpdateKind, State, list[ClientUpdate]], State]) -> None:
        self._global = global_state
        self._finish = finish
        self._updates: list[ClientUpdate] = []
        self._kind: UpdateKind | None = None

    def add(self, update: ClientUpdate) -> None:
        self._kind = same_kind(self._kind, update)
        self._updates.append(update)

    def finish(self) -> State:
        updates, self._updates = self._updates, []
        if self._kind is None:
            raise ValueError("no updates to aggregate")
        return self._finish(self._kind, self._global, updates)


class RobustStrategy(Strategy):
    """Base of the robust strategies: subclasses implement :meth:`combine` over all of a round's updates.

    ``server_lr`` and ``server_momentum`` only matter for ``gradients`` updates, as in FedAvg.
    """

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        self._sgd = ServerSGD(lr=server_lr, momentum=server_momentum)

    @property
    def requirement(self) -> str:
        """Why :attr:`min_updates` is what it is, with the parameters' values, for error messages."""
        return ""

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        def finish(kind: UpdateKind, global_state: State, updates: list[ClientUpdate]) -> State:
            if len(updates) < self.min_updates:
                raise TooFewUpdates(
                    f"round {server_round}: strategy {self.name!r} needs at least {self.min_updates} updates "
                    f"({self.requirement}), got {len(updates)}"
                )
            combined = self.combine([u.state for u in updates], [u.num_samples for u in updates])
            return to_global(kind, global_state, combined, self._sgd)

        return BufferedAggregation(global_state, finish)

    @abstractmethod
    def combine(self, states: list[Mapping[str, torch.Tensor]], num_samples: list[int]) -> State:
        """One state from all of the round's states (same names, shapes, dtypes), in their representation."""

    def state_dict(self) -> dict[str, Any]:
        return self._sgd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sgd.load_state_dict(state)
