"""FedAvgM (Hsu et al. 2019): heavy-ball momentum on the pseudo-gradient."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.strategy import FedAvg, FedAvgM


def test_two_rounds_by_hand(fold, f64) -> None:
    strategy = FedAvgM(server_lr=0.5, momentum=0.5)
    state = {"w": f64(0, 0), "steps": torch.tensor(5)}
    # round 1: mean (2, -4), Δ = (2, -4), v = Δ, w = 0 + 0.5 * v = (1, -2); steps: (6 + 10)/2 = 8
    updates = [(1, {"w": f64(0, -4), "steps": torch.tensor(6)}), (1, {"w": f64(4, -4), "steps": torch.tensor(10)})]
    state = fold(strategy, state, updates)
    assert torch.equal(state["w"], f64(1, -2)) and int(state["steps"]) == 8
    # round 2: mean (3, 0), Δ = (2, 2), v = 0.5 * (2, -4) + (2, 2) = (3, 0), w = (1, -2) + 0.5 * (3, 0) = (2.5, -2)
    state = fold(strategy, state, [(4, {"w": f64(3, 0), "steps": torch.tensor(9)})], server_round=2)
    assert torch.equal(state["w"], f64(2.5, -2))
    assert torch.equal(strategy.state_dict()["velocity"]["w"], f64(3, 0))


def test_delta_updates_are_the_pseudo_gradient(fold, f64) -> None:
    # Δ = mean delta (1, 3); v = Δ; w = (1, 1) + 2 * (1, 3) = (3, 7)
    out = fold(FedAvgM(server_lr=2.0), {"w": f64(1, 1)}, [(1, {"w": f64(0, 2)}), (1, {"w": f64(2, 4)})], kind="delta")
    assert torch.equal(out["w"], f64(3, 7))


def test_gradients_match_fedavg_server_momentum(fold, f64) -> None:
    # Δ = -g, so FedAvgM on gradients is FedAvg's server SGD with the same momentum (signs of v differ).
    fedavgm, fedavg = FedAvgM(server_lr=0.5, momentum=0.5), FedAvg(server_lr=0.5, server_momentum=0.5)
    a = b = {"w": f64(0, 0), "bn.count": torch.tensor(3)}
    for server_round, g in enumerate([f64(2, -4), f64(2, 2), f64(-1, 0.5)], start=1):
        a = fold(fedavgm, a, [(1, {"w": g})], kind="gradients", server_round=server_round)
        b = fold(fedavg, b, [(1, {"w": g})], kind="gradients", server_round=server_round)
        assert torch.equal(a["w"], b["w"]) and int(a["bn.count"]) == 3
    assert torch.equal(a["w"], f64(-2.5 - 0.5 * 0.5, 2 - 0.5 * 0.5))  # round 3: v = 0.5*(3, 0) + (-1, 0.5)


def test_zero_momentum_and_unit_rate_is_fedavg(fold, f64) -> None:
    updates = [(1, {"w": f64(0.5, 3)}), (3, {"w": f64(1.5, -1)})]
    out = fold(FedAvgM(momentum=0.0), {"w": f64(0.25, 0.25)}, updates)
    assert torch.equal(out["w"], f64(1.25, 0))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, "momentum must be in"),
        ({"server_lr": 0.0}, r"server_lr must be in \(0, inf\)"),
    ],
)
def test_bad_parameters(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedAvgM(**params)


def test_load_state_dict_checks_the_groups(f64) -> None:
    with pytest.raises(ValueError, match=r"unexpected state keys \['m'\]"):
        FedAvgM().load_state_dict({"m": {"w": f64(1)}})
    with pytest.raises(ValueError, match="must map tensor names to tensors"):
        FedAvgM().load_state_dict({"velocity": {"w": [1.0]}})
