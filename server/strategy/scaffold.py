"""SCAFFOLD: local steps corrected by control variates, so workers with skewed data stop drifting apart.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II. The coordinator keeps the server control variate ``c``; each
worker keeps its own ``c_i`` between rounds (the worker's per-run store) and corrects every local gradient to
``g + c - c_i`` (the worker's ``scaffold`` training hook, :class:`fedlink.hooks.ScaffoldHook`). Each round:

- ``c`` travels to the selected workers as extra tensors of the announced global state, ``scaffold/c/<param>``,
  which the hook declares (:meth:`fedlink.hooks.TrainingHook.inputs`) so the worker checks them with the model's
  tensors before a byte moves;
- each worker's ``Δc_i`` comes back as extra tensors of its update, ``scaffold/delta_c/<param>``, which this
  strategy adds to the expected update header, so the coordinator checks them like the update itself;
- ``x += server_lr * Δx`` with ``Δx`` the sample-weighted mean update (as FedAvg weighs), and
  ``c = (1/N) Σ_i c_i``, kept as the running sum ``Σ_i c_i += Σ_{i∈S} Δc_i`` (the paper's
  ``c += |S|/N · mean Δc_i``). ``N`` is ``num_workers`` when given, else the number of distinct workers that have
  contributed so far.

Nothing about SCAFFOLD is known to the session, the daemon or the wire format: they move named tensors. The sum
of control variates and the workers seen are checkpointed (:meth:`Scaffold.state_dict`), and the worker keeps
its last few ``c_i`` by round, so a resumed run repeats bit for bit.

A worker that lost its ``c_i`` (restarted) starts again from zero and says so (``scaffold_fresh``); the
coordinator logs a warning naming it and counts it in the round's ``scaffold_lost_state``. Its old ``c_i``
stays in the sum (the coordinator keeps no per-worker state: memory would grow with workers x model), so ``c``
is off by that ``c_i / N`` until the run ends; the same holds for a worker whose update was dropped after it
trained. Streaming: one accumulator for the update and one for ``Δc``.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from fedlink.factory import ModelAllowList, build_model
from fedlink.protocol.messages import HookSpec, ModelSpec, TrainingPlan, UpdateKind
from fedlink.protocol.spill import subset
from fedlink.protocol.tensors import State, StateHeader, header_of
from fedlink.scaffold import DELTA, PREFIX, control_name, delta_specs

from ..aggregate import WeightedSum
from ..errors import ConfigError
from .base import Aggregate, Aggregation, ClientUpdate, RoundContext, Strategy, as_aggregate, check_float, check_int
from .updates import apply_pseudo_gradient, load_tensor_groups, same_kind

if TYPE_CHECKING:
    from ..engine import RoundDriver

__all__ = ["Scaffold", "parameter_header"]

log = logging.getLogger("fedlink.server")

# The coordinator builds the model its own config names.
_TRUST_CONFIG = ModelAllowList(("*",))


@lru_cache(maxsize=8)
def _parameters(factory: str, kwargs_json: str) -> StateHeader:
    with torch.device("meta"):
        model = build_model(factory, json.loads(kwargs_json), _TRUST_CONFIG)
    return header_of(dict(model.named_parameters()))


def parameter_header(model: ModelSpec) -> StateHeader:
    """The model's parameters (what control variates cover), found on the meta device without allocating."""
    return _parameters(model.factory, json.dumps(model.kwargs, sort_keys=True))


class Scaffold(Strategy):
    name = "scaffold"

    def __init__(self, *, server_lr: float = 1.0, num_workers: int | None = None) -> None:
        self.server_lr = check_float("server_lr", server_lr, low=0, low_open=True)
        self.num_workers = None if num_workers is None else check_int("num_workers", num_workers, low=1)
        self._sum_c: dict[str, torch.Tensor] = {}  # Σ_i c_i over every worker
        self._seen: list[str] = []  # workers whose c_i is in the sum, sorted

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        if plan.update == "gradients":
            raise ConfigError(
                "strategy scaffold needs training.update 'weights' or 'delta': with 'gradients' (FedSGD) the "
                "workers take no local steps, so there is no drift to correct"
            )
        if plan.optimizer.name != "sgd":
            raise ConfigError(
                f"strategy scaffold needs training.optimizer.name 'sgd', got {plan.optimizer.name!r}: its control "
                "variates are estimated from SGD steps (option II of the paper)"
            )
        hook = HookSpec(name="scaffold", params={"lr": plan.optimizer.lr, "momentum": plan.optimizer.momentum})
        return plan.with_hook(hook)

    def control(self, parameters: StateHeader) -> dict[str, torch.Tensor]:
        """The server control variate ``c`` per floating-point parameter (zeros before the first round)."""
        n = self.num_workers or len(self._seen)
        out: dict[str, torch.Tensor] = {}
        for spec in parameters.tensors:
            total = self._sum_c.get(spec.name)
            if total is not None:
                out[spec.name] = total / n
            elif spec.dtype.startswith(("float", "bfloat")):
                out[spec.name] = torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype))
        return out

    async def run_round(self, driver: "RoundDriver") -> Aggregate:
        parameters = parameter_header(driver.model)
        sent = {**driver.global_state, **{control_name(n): c for n, c in self.control(parameters).items()}}
        update_header = StateHeader(tensors=(*driver.update_header.tensors, *delta_specs(parameters)))
        aggregation = self.start_round(driver.context, driver.global_state)
        await driver.run(driver.train_stage(aggregation, state=sent, update_header=update_header))
        return as_aggregate(aggregation.finish())

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        return _ScaffoldAggregation(self, server_round, global_state)

    def start_round(self, context: RoundContext, global_state: State) -> Aggregation:
        return self.begin_round(context.server_round, global_state)

    def _apply(self, deltas: dict[str, torch.Tensor], contributors: list[str]) -> None:
        """Fold the round's ``Σ Δc_i`` into the sum; replaces tensors, never changes them (checkpoint snapshots)."""
        self._sum_c = {
            name: (self._sum_c[name] + delta) if name in self._sum_c else delta for name, delta in deltas.items()
        } | {name: total for name, total in self._sum_c.items() if name not in deltas}
        self._seen = sorted(set(self._seen) | set(contributors))

    def state_dict(self) -> dict[str, Any]:
        if not self._seen:
            return {}
        return {"sum_c": dict(self._sum_c), "seen": list(self._seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seen = state.get("seen", [])
        if not isinstance(seen, list) or not all(isinstance(w, str) for w in seen):
            raise ValueError(f"strategy 'scaffold': state['seen'] must be a list of worker ids, got {seen!r}")
        tensors = load_tensor_groups({k: v for k, v in state.items() if k != "seen"}, ("sum_c",), owner="strategy 'scaffold'")
        self._sum_c = tensors.get("sum_c", {})
        self._seen = sorted(seen)


class _ScaffoldAggregation(Aggregation):
    """The sample-weighted mean of the model updates, and the plain sum of the workers' ``Δc_i``."""

    def __init__(self, strategy: Scaffold, server_round: int, global_state: State) -> None:
        self._strategy = strategy
        self._round = server_round
        self._global = global_state
        self._sum = WeightedSum()
        self._delta_c: dict[str, torch.Tensor] = {}
        self._kind: UpdateKind | None = None
        self._workers: list[str] = []
        self._lost: list[str] = []

    def add(self, update: ClientUpdate) -> None:
        self._kind = same_kind(self._kind, update)
        model = subset(update.state, tuple(k for k in update.state if not k.startswith(PREFIX)))
        self._sum.add(model, float(update.num_samples))
        for key in update.state:
            if key.startswith(DELTA):
                name = key[len(DELTA):]
                value = update.state[key]
                total = self._delta_c.get(name)
                self._delta_c[name] = value.clone() if total is None else total.add_(value)
        if update.metrics.get("scaffold_fresh") and update.worker in self._strategy._seen:
            self._lost.append(update.worker)
            log.warning(
                "round %d: worker %r has lost its SCAFFOLD control variate (restarted?); it starts again from zero",
                self._round, update.worker,
            )
        self._workers.append(update.worker)

    def finish(self) -> Aggregate:
        mean = self._sum.mean()  # raises on an empty round
        assert self._kind is not None
        lr = self._strategy.server_lr
        state = apply_pseudo_gradient(self._kind, self._global, mean, lambda name, delta: delta.mul_(lr))
        self._strategy._apply(self._delta_c, self._workers)
        squares = sum(float(t.double().square().sum()) for t in self._strategy._sum_c.values())
        n = self._strategy.num_workers or len(self._strategy._seen)
        return Aggregate(state, {"scaffold_lost_state": float(len(self._lost)), "scaffold_c_norm": squares**0.5 / n})

