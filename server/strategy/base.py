"""The strategy interface: what to ask the workers each round, and how their updates become the next model.

A strategy never touches the network. The coordinator's round loop asks it for the round's training plan
(:meth:`Strategy.configure_train`), opens an :class:`Aggregation` for the round, feeds it each accepted update as
it arrives (in a fixed order, so runs repeat bit for bit) and asks it for the new global state. State that lives
across rounds (server momentum, optimizer moments) belongs to the strategy and round-trips through
:meth:`Strategy.state_dict` / :meth:`Strategy.load_state_dict` for checkpoints.

Streaming strategies fold each update into running sums and keep nothing else; robust ones (median, Krum) must
keep every update until :meth:`Aggregation.finish` and say so in their docstring.

How the three update kinds (weights, delta, gradients) become the next global state is written once, in
:mod:`.updates`; the two families built on it are :mod:`.serveropt` (FedAvgM, FedAdam...) and :mod:`.robust`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedlink.protocol.messages import TrainingPlan, UpdateKind
from fedlink.protocol.tensors import State

from ..errors import NotEnoughWorkers

if TYPE_CHECKING:
    from ..engine import RoundDriver

__all__ = [
    "ClientUpdate",
    "Aggregate",
    "Aggregation",
    "RoundContext",
    "Strategy",
    "TooFewUpdates",
    "as_aggregate",
    "check_float",
    "check_int",
]


@dataclass
class RoundContext:
    """What a strategy knows about the round it aggregates: its number and a generator seeded for it.

    ``generator`` is derived from the run's seed and the round, so a strategy that draws random numbers (server
    noise, sampling among updates) repeats exactly and resumes exactly; never use torch's global generator.
    """

    server_round: int
    seed: int
    generator: torch.Generator


@dataclass
class Aggregate:
    """The result of a round: the next global state, and metrics the strategy wants in ``metrics.jsonl``."""

    state: State
    metrics: dict[str, float] = field(default_factory=dict)


def as_aggregate(result: "State | Aggregate") -> Aggregate:
    return result if isinstance(result, Aggregate) else Aggregate(result)


@dataclass(frozen=True)
class ClientUpdate:
    """One worker's accepted result: already checked for tensor names, shapes, dtypes and finiteness."""

    worker: str
    kind: UpdateKind
    num_samples: int
    #: A dict, or for a large update a :class:`~fedlink.protocol.spill.SpilledState` read from disk on access.
    state: Mapping[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    staleness: int = 0  # asynchronous training: server updates since the model this update started from


class TooFewUpdates(NotEnoughWorkers, ValueError):
    """A round ended with fewer updates than the strategy's rule needs (Krum: ``n > 2f + 2``).

    A :class:`~fedlink.server.errors.NotEnoughWorkers`, so the coordinator reports it like any short round.
    """


class Aggregation(ABC):
    """One round's fold. ``add`` is called once per accepted update, then ``finish`` once."""

    @abstractmethod
    def add(self, update: ClientUpdate) -> None: ...

    @abstractmethod
    def finish(self) -> State | Aggregate:
        """The next global state (same tensor names, shapes and dtypes as the current one), optionally with
        metrics as an :class:`Aggregate`."""


class Strategy(ABC):
    """Base of every aggregation method; subclasses set ``name`` and implement :meth:`begin_round`.

    Parameters come from the config as keyword-only constructor arguments; raise ValueError (or TypeError) with
    the offending value and :func:`~fedlink.server.strategy.build_strategy` turns it into a ConfigError.
    """

    name: ClassVar[str] = ""

    @property
    def min_updates(self) -> int:
        """The fewest accepted updates a round needs with these parameters; the coordinator can check
        ``sampling.min_workers`` against it before the first round."""
        return 1

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        """The plan sent to every selected worker this round; override to set per-round extras."""
        return plan

    @abstractmethod
    def begin_round(self, server_round: int, global_state: State) -> Aggregation: ...

    def start_round(self, context: RoundContext, global_state: State) -> Aggregation:
        """Open the round's fold; override instead of :meth:`begin_round` to use the round's seeded generator."""
        return self.begin_round(context.server_round, global_state)

    async def run_round(self, driver: "RoundDriver") -> Aggregate:
        """The round as a sequence of stages; the default is one train stage folded into :meth:`start_round`.

        Override it (or return a workflow from it) for rounds of several stages: each ``await driver.run(stage)``
        sends one typed request to every surviving worker, each on its own deadline, and hands back the results
        and the failures; the survivors only shrink from stage to stage.
        """
        aggregation = self.start_round(driver.context, driver.global_state)
        await driver.run(driver.train_stage(aggregation))
        return as_aggregate(aggregation.finish())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy exactly (tensors allowed); empty when stateless.

        Built-in strategies never modify the returned tensors afterwards, so a snapshot stays valid while the
        run goes on.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)}")


def check_float(
    name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True
) -> float:
    """``value`` as a finite float within the interval, else TypeError/ValueError naming ``name`` and the value.

    Numeric strings are accepted because YAML 1.1 (PyYAML) reads ``1e-3`` as the string ``"1e-3"``.
    """
    number: float
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_int(name: str, value: object, *, low: int) -> int:
    """``value`` as an int ``>= low``, else TypeError/ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value
