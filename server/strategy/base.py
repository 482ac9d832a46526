"""The strategy interface: what to ask the workers each round, and how their updates become the next model.

A strategy never touches the network. The coordinator's round loop asks it for the round's training plan
(:meth:`Strategy.configure_train`), opens an :class:`Aggregation` for the round, feeds it each accepted update as
it arrives (in a fixed order, so runs repeat bit for bit) and asks it for the new global state. State that lives
across rounds (server momentum, optimizer moments) belongs to the strategy and round-trips through
:meth:`Strategy.state_dict` / :meth:`Strategy.load_state_dict` for checkpoints.

Streaming strategies fold each update into running sums and keep nothing else; robust ones (median, Krum) must
keep every update until :meth:`Aggregation.finish` and say so in their docstring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedlink.protocol.messages import TrainingPlan, UpdateKind
from fedlink.protocol.tensors import State

__all__ = ["ClientUpdate", "Aggregation", "Strategy"]


@dataclass(frozen=True)
class ClientUpdate:
    """One worker's accepted result: already checked for tensor names, shapes, dtypes and finiteness."""

    worker: str
    kind: UpdateKind
    num_samples: int
    state: State
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregation(ABC):
    """One round's fold. ``add`` is called once per accepted update, then ``finish`` once."""

    @abstractmethod
    def add(self, update: ClientUpdate) -> None: ...

    @abstractmethod
    def finish(self) -> State:
        """The next global state (same tensor names, shapes and dtypes as the current one)."""


class Strategy(ABC):
    """Base of every aggregation method; subclasses set ``name`` and implement :meth:`begin_round`."""

    name: ClassVar[str] = ""

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        """The plan sent to every selected worker this round; override to set per-round extras."""
        return plan

    @abstractmethod
    def begin_round(self, server_round: int, global_state: State) -> Aggregation: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy exactly (tensors allowed); empty when stateless."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)}")
