"""FedBuff: asynchronous training with a buffer of K updates, each weighted down by its staleness.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022. Workers train continuously, each on the latest model it was sent; the coordinator
adds each arriving delta ``Δ_i``, weighted by ``s(τ_i)``, to a buffer, and every ``buffer_size`` results applies
``x ← x + server_lr · (1/K) Σ s(τ_i) Δ_i``. ``τ_i`` is the number of server updates since the model the worker
started from; ``staleness: polynomial`` uses ``s(τ) = (1 + τ)^-exponent`` (the paper's choice, exponent 0.5),
``constant`` uses 1. ``rounds`` counts server updates. Integer and bool buffers take the weighted mean of the
values sent. Streaming: one accumulator. The run loop lives in :mod:`fedlink.server.buffered`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from fedlink.protocol.messages import TrainingPlan
from fedlink.protocol.tensors import State

from ..aggregate import WeightedSum
from ..errors import ConfigError
from .base import Aggregation, ClientUpdate, Strategy, check_float, check_int
from .updates import apply_pseudo_gradient

__all__ = ["FedBuff", "BufferedAggregation"]


class BufferedAggregation(Aggregation):
    def __init__(self, strategy: "FedBuff", global_state: State) -> None:
        self._strategy = strategy
        self._global = global_state
        self._sum = WeightedSum()
        self.staleness: list[int] = []

    @property
    def count(self) -> int:
        return self._sum.count

    def add(self, update: ClientUpdate) -> None:
        if update.kind != "delta":
            raise ValueError(f"fedbuff folds deltas, got {update.kind}")
        self._sum.add(update.state, self._strategy.staleness_weight(update.staleness))
        self.staleness.append(update.staleness)

    def finish(self) -> State:
        # The weighted mean times (Σ s / K) is (1/K) Σ s Δ: the paper's buffer average.
        scale = self._strategy.server_lr * self._sum.total_weight / self._sum.count
        # The step is taken in the mean's own memory (see apply_pseudo_gradient): a server update holds the model
        # and one mean, not a third model's worth.
        return apply_pseudo_gradient("delta", self._global, self._sum.mean(), lambda name, delta: delta.mul_(scale))


class FedBuff(Strategy):
    name = "fedbuff"
    asynchronous: ClassVar[bool] = True

    def __init__(
        self,
        *,
        buffer_size: int = 3,
        server_lr: float = 1.0,
        staleness: Literal["polynomial", "constant"] = "polynomial",
        exponent: float = 0.5,
        max_staleness: int | None = None,
    ) -> None:
        self.buffer_size = check_int("buffer_size", buffer_size, low=1)
        self.server_lr = check_float("server_lr", server_lr, low=0, low_open=True)
        if staleness not in ("polynomial", "constant"):
            raise ValueError(f"staleness must be 'polynomial' or 'constant', got {staleness!r}")
        self.staleness = staleness
        self.exponent = check_float("exponent", exponent, low=0)
        self.max_staleness = None if max_staleness is None else check_int("max_staleness", max_staleness, low=0)

    @property
    def min_updates(self) -> int:
        return 1

    def staleness_weight(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness cannot be negative, got {tau}")
        return 1.0 if self.staleness == "constant" else float((1 + tau) ** -self.exponent)

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        if plan.update != "delta":
            raise ConfigError(
                f"strategy fedbuff needs training.update 'delta' (got {plan.update!r}): updates are applied to a "
                "newer model than the one they were trained from, which only a change (a delta) can be"
            )
        return plan

    def begin_round(self, server_round: int, global_state: State) -> BufferedAggregation:
        return BufferedAggregation(self, global_state)
