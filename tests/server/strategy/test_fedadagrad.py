"""FedAdagrad (Reddi et al. 2021, Algorithm 2): v = v + Δ², x += eta * m / (sqrt(v) + tau), v starting at tau²."""

from __future__ import annotations

import math

import pytest
import torch

from fedlink.server.strategy import FedAdagrad


def test_two_rounds_by_hand(fold, f64) -> None:
    strategy = FedAdagrad(eta=1.0, tau=1.5)  # beta1 = 0: m = Δ, and no m is kept
    state = {"w": f64(1, -1), "steps": torch.tensor(5)}
    # round 1: mean (0*1 + 4*3)/4 = 3, -1 -> Δ = (2, 0); v = 2.25 + (4, 0) = (6.25, 2.25);
    # sqrt(v) + tau = (4, 3); step = (2/4, 0/3) = (0.5, 0) -> w = (1.5, -1); steps: (6 + 30)/4 = 9
    updates = [(1, {"w": f64(0, -1), "steps": torch.tensor(6)}), (3, {"w": f64(4, -1), "steps": torch.tensor(10)})]
    state = fold(strategy, state, updates)
    assert torch.equal(state["w"], f64(1.5, -1)) and int(state["steps"]) == 9
    assert strategy.state_dict()["m"] == {}
    # round 2: Δ = (2, 0) again; v = (10.25, 2.25); step = 2 / (sqrt(10.25) + 1.5)
    state = fold(strategy, state, [(1, {"w": f64(3.5, -1), "steps": torch.tensor(9)})], server_round=2)
    torch.testing.assert_close(state["w"], f64(1.5 + 2 / (math.sqrt(10.25) + 1.5), -1))
    torch.testing.assert_close(strategy.state_dict()["v"]["w"], f64(10.25, 2.25))


def test_server_momentum_when_beta1_is_set(fold, f64) -> None:
    # same round 1 with beta1 = 0.5: m = 0.5 * Δ = (1, 0), step = (1/4, 0)
    out = fold(FedAdagrad(eta=1.0, tau=1.5, beta1=0.5), {"w": f64(1, -1)}, [(1, {"w": f64(3, -1)})])
    assert torch.equal(out["w"], f64(1.25, -1))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"eta": 0.0}, r"eta must be in \(0, inf\)"),
        ({"tau": 0.0}, r"tau must be in \(0, inf\)"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ],
)
def test_bad_parameters(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedAdagrad(**params)


def test_adagrad_has_no_beta2() -> None:
    with pytest.raises(TypeError, match="beta2"):
        FedAdagrad(beta2=0.99)  # type: ignore[call-arg]
