"""Helpers for the strategy tests: one round of a strategy over hand-written updates, without any network."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from fedlink.protocol.messages import UpdateKind
from fedlink.protocol.tensors import State
from fedlink.server.strategy import ClientUpdate, Strategy

def fold_round(
    strategy: Strategy,
    global_state: State,
    updates: Sequence[tuple[int, State]],
    *,
    kind: UpdateKind = "weights",
    server_round: int = 1,
) -> State:
    """Feed ``(num_samples, state)`` pairs to one round of ``strategy``, in order, and return the new state."""
    aggregation = strategy.begin_round(server_round, global_state)
    for i, (num_samples, state) in enumerate(updates):
        aggregation.add(ClientUpdate(worker=f"w{i}", kind=kind, num_samples=num_samples, state=state))
    return aggregation.finish()


@pytest.fixture
def fold() -> Callable[..., State]:
    return fold_round


@pytest.fixture
def f64() -> Callable[..., torch.Tensor]:
    """``f64(1, 2.5)``: a float64 vector, so hand-computed values compare without float32 rounding."""
    return lambda *values: torch.tensor(values, dtype=torch.float64)
