"""FedYogi (Reddi et al. 2021, Algorithm 2): v = v - (1 - beta2) * Δ² * sign(v - Δ²), v starting at tau²."""

from __future__ import annotations

import math

import pytest
import torch

from fedlink.server.strategy import FedYogi


def test_two_rounds_by_hand_on_gradients(fold, f64) -> None:
    strategy = FedYogi(eta=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    state = {"w": f64(0, 0), "bn.count": torch.tensor(7)}
    # round 1: mean gradient (-1, -4) -> Δ = (1, 4); Δ² = (1, 16); v0 = tau² = 1; sign(v0 - Δ²) = (0, -1);
    # v = (1 - 0, 1 + 0.5 * 16) = (1, 9); m = 0.5 * Δ = (0.5, 2); step = (0.5/2, 2/4) = (0.25, 0.5)
    grads = [(1, {"w": f64(0, -4)}), (1, {"w": f64(-2, -4)})]
    state = fold(strategy, state, grads, kind="gradients")
    assert torch.equal(state["w"], f64(0.25, 0.5))
    assert int(state["bn.count"]) == 7  # buffers are not in gradient updates and stay as they are
    # round 2: g = (0, -2) -> Δ = (0, 2), Δ² = (0, 4); sign(v - Δ²) = (1, 1); v = (1 - 0, 9 - 0.5 * 4) = (1, 7)
    # (Adam would give 0.5 * 9 + 0.5 * 4 = 6.5); m = 0.5 * (0.5, 2) + 0.5 * (0, 2) = (0.25, 2);
    # step = (0.25/2, 2/(sqrt(7) + 1))
    state = fold(strategy, state, [(1, {"w": f64(0, -2)})], kind="gradients", server_round=2)
    torch.testing.assert_close(state["w"], f64(0.25 + 0.125, 0.5 + 2 / (math.sqrt(7) + 1)))
    assert torch.equal(strategy.state_dict()["v"]["w"], f64(1, 7))


def test_defaults() -> None:
    strategy = FedYogi()
    assert (strategy.eta, strategy.beta1, strategy.beta2, strategy.tau) == (0.03, 0.9, 0.99, 1e-3)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"beta2": 1.5}, "beta2 must be in"),
        ({"tau": float("inf")}, "tau must be in"),
        ({"eta": -1}, "eta must be in"),
    ],
)
def test_bad_parameters(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedYogi(**params)
