"""FedNova: normalised averaging, so workers that take more local steps do not pull the model their way.

Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020. When worker ``i`` runs ``τ_i`` local steps (bigger shard, more epochs, a
``max_steps`` cap), FedAvg's average weighs its update by ``p_i τ_i`` and converges to the optimum of a
different objective. FedNova divides each worker's change by the norm of its step coefficients ``a_i`` and
rescales by their weighted mean:

    x+ = x + server_lr · τ_eff · Σ_i p_i Δ_i / a_i,    τ_eff = Σ_i p_i a_i,    p_i = n_i / Σ_j n_j

with ``a_i = τ_i`` for plain SGD and ``a_i = (τ_i - ρ(1 - ρ^τ_i)/(1 - ρ)) / (1 - ρ)`` for SGD with momentum ``ρ``
(the paper's section 4). ``τ_i`` is the step count the worker reports (``metrics['steps']``); a result without
one is refused. Workers taking equal steps get exactly FedAvg's average. Streaming: the update is folded with
weight ``n_i / a_i`` into one running sum, and the scale is applied once at the end.
"""

from __future__ import annotations

import math

from fedlink.protocol.messages import TrainingPlan, UpdateKind
from fedlink.protocol.tensors import State

from ..aggregate import WeightedSum
from ..errors import ConfigError, InvalidUpdate
from .base import Aggregate, Aggregation, ClientUpdate, Strategy, check_float
from .updates import apply_pseudo_gradient, same_kind

__all__ = ["FedNova", "step_norm"]


def step_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` for ``steps`` local SGD steps with heavy-ball ``momentum`` (the paper's ``a_i``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)


class FedNova(Strategy):
    name = "fednova"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = check_float("server_lr", server_lr, low=0, low_open=True)
        self._momentum = 0.0

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        if plan.update == "gradients":
            raise ConfigError(
                "strategy fednova needs training.update 'weights' or 'delta': with 'gradients' (FedSGD) every "
                "worker takes one step, and there is nothing to normalise"
            )
        if plan.optimizer.name != "sgd":
            raise ConfigError(
                f"strategy fednova needs training.optimizer.name 'sgd', got {plan.optimizer.name!r}: its "
                "normalisation is derived for SGD steps (with or without momentum)"
            )
        self._momentum = plan.optimizer.momentum
        return plan

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        return _NovaAggregation(global_state, momentum=self._momentum, server_lr=self.server_lr)


class _NovaAggregation(Aggregation):
    def __init__(self, global_state: State, *, momentum: float, server_lr: float) -> None:
        self._global = global_state
        self._momentum = momentum
        self._server_lr = server_lr
        self._sum = WeightedSum()
        self._kind: UpdateKind | None = None
        self._samples = 0.0
        self._samples_times_a = 0.0
        self._steps: list[int] = []

    def add(self, update: ClientUpdate) -> None:
        steps = update.metrics.get("steps")
        if steps is None or not math.isfinite(steps) or steps < 1 or steps != int(steps):
            raise InvalidUpdate(f"reports no usable local step count (metrics['steps'] = {steps!r}), which fednova needs")
        self._kind = same_kind(self._kind, update)
        a = step_norm(int(steps), self._momentum)
        self._sum.add(update.state, update.num_samples / a)
        self._samples += update.num_samples
        self._samples_times_a += update.num_samples * a
        self._steps.append(int(steps))

    def finish(self) -> Aggregate:
        mean = self._sum.mean()  # raises on an empty round
        assert self._kind is not None
        tau_eff = self._samples_times_a / self._samples
        scale = self._server_lr * tau_eff * self._sum.total_weight / self._samples
        state = apply_pseudo_gradient(self._kind, self._global, mean, lambda name, delta: delta.mul_(scale))
        return Aggregate(state, {"fednova_tau_eff": tau_eff, "fednova_steps_max": float(max(self._steps)),
                                 "fednova_steps_min": float(min(self._steps))})
