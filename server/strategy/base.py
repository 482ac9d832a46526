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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedlink.protocol.messages import TrainingPlan, UpdateKind
from fedlink.protocol.tensors import State

from ..errors import NotEnoughWorkers

__all__ = ["ClientUpdate", "Aggregation", "Strategy", "TooFewUpdates", "check_float", "check_int"]


@dataclass(frozen=True)
class ClientUpdate:
    """One worker's accepted result: already checked for tensor names, shapes, dtypes and finiteness."""

    worker: str
    kind: UpdateKind
    num_samples: int
    state: State
    metrics: dict[str, float] = field(default_factory=dict)


class TooFewUpdates(NotEnoughWorkers, ValueError):
    """A round ended with fewer updates than the strategy's rule needs (Krum: ``n > 2f + 2``).

    A :class:`~fedlink.server.errors.NotEnoughWorkers`, so the coordinator reports it like any short round.
    """


class Aggregation(ABC):
    """One round's fold. ``add`` is called once per accepted update, then ``finish`` once."""

    @abstractmethod
    def add(self, update: ClientUpdate) -> None: ...

    @abstractmethod
    def finish(self) -> State:
        """The next global state (same tensor names, shapes and dtypes as the current one)."""


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
