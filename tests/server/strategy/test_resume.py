"""Every strategy resumes bit-identically: run 3 rounds; or run 1, save, restore into a fresh instance, run 2 more.

The snapshot is taken after round 1 and serialised only after the original instance has gone on to rounds 2 and
3, so a strategy that modified its saved tensors in place would fail here too.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedlink.protocol.messages import UpdateKind
from fedlink.protocol.tensors import State
from fedlink.server.strategy import Strategy, build_strategy

WORKERS = 5
CASES: list[tuple[str, dict[str, Any], UpdateKind, bool]] = [
    # name, params, update kind, whether the strategy keeps cross-round state in this configuration
    ("fedavg", {}, "weights", False),
    ("fedavg", {"server_lr": 0.5, "server_momentum": 0.9}, "gradients", True),
    ("fedprox", {"mu": 0.1, "server_momentum": 0.5}, "delta", False),
    ("fedavgm", {}, "weights", True),
    ("fedavgm", {"server_lr": 0.7, "momentum": 0.8}, "gradients", True),
    ("fedadagrad", {"eta": 0.1}, "delta", True),
    ("fedadagrad", {"beta1": 0.5}, "weights", True),
    ("fedadam", {}, "weights", True),
    ("fedadam", {"eta": 0.1}, "gradients", True),
    ("fedyogi", {}, "delta", True),
    ("median", {}, "weights", False),
    ("median", {"server_momentum": 0.9}, "gradients", True),
    ("trimmed_mean", {"beta": 0.2}, "delta", False),
    ("krum", {"num_byzantine": 1, "server_momentum": 0.5}, "gradients", True),
    ("multi_krum", {"num_byzantine": 1, "num_selected": 3}, "weights", False),
]


def _initial() -> State:
    gen = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(3, 2, generator=gen),
        "fc.bias": torch.randn(3, generator=gen, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def _round_updates(server_round: int, kind: UpdateKind, global_state: State) -> list[tuple[int, State]]:
    gen = torch.Generator().manual_seed(server_round)
    updates = []
    for worker in range(WORKERS):
        noise = {
            k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.1
            for k, v in global_state.items()
            if v.is_floating_point()
        }
        if kind == "weights":
            state = {k: global_state[k] + n for k, n in noise.items()}
        else:
            state = dict(noise)
        if kind != "gradients":  # gradients cover parameters only
            state["bn.num_batches_tracked"] = torch.tensor(10 * server_round + worker)
        updates.append((10 + worker, state))
    return updates


def _play(
    fold: Callable[..., State], strategy: Strategy, state: State, kind: UpdateKind, rounds: range
) -> list[State]:
    states = []
    for server_round in rounds:
        state = fold(strategy, state, _round_updates(server_round, kind, state), kind=kind, server_round=server_round)
        states.append(state)
    return states


def _equal(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("name", "params", "kind", "stateful"), CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)]
)
def test_resume_is_bit_identical(
    fold: Callable[..., State], name: str, params: dict[str, Any], kind: UpdateKind, stateful: bool
) -> None:
    straight = build_strategy(name, params)
    first = _play(fold, straight, _initial(), kind, range(1, 2))[0]
    snapshot = straight.state_dict()
    expected = _play(fold, straight, first, kind, range(2, 4))

    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    resumed = build_strategy(name, params)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = _play(fold, resumed, first, kind, range(2, 4))
    assert all(_equal(e, g) for e, g in zip(expected, got))

    assert bool(snapshot) == stateful
    if stateful:  # the state matters: a fresh instance without it takes a different path
        assert not _equal(_play(fold, build_strategy(name, params), first, kind, range(2, 4))[0], expected[0])


def test_empty_state_resets(fold: Callable[..., State], f64: Callable[..., torch.Tensor]) -> None:
    strategy = build_strategy("fedadam", {})
    fold(strategy, {"w": f64(0)}, [(1, {"w": f64(1)})])
    assert strategy.state_dict()
    strategy.load_state_dict({})
    assert strategy.state_dict() == {}
