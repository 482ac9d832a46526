"""FedAdam (Reddi et al. 2021, Algorithm 2): v = beta2 * v + (1 - beta2) * Δ², no bias correction."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.strategy import FedAdam


def test_two_rounds_by_hand_on_deltas(fold, f64) -> None:
    strategy = FedAdam(eta=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    state = {"w": f64(0, 0)}
    # round 1: Δ = mean delta = (1, -7); m = 0.5 * Δ = (0.5, -3.5); v = 0.5 * 1 + 0.5 * (1, 49) = (1, 25);
    # step = m / (sqrt(v) + 1) = (0.5/2, -3.5/6) = (1/4, -7/12)
    state = fold(strategy, state, [(1, {"w": f64(2, -6)}), (1, {"w": f64(0, -8)})], kind="delta")
    torch.testing.assert_close(state["w"], f64(1 / 4, -7 / 12), rtol=0, atol=1e-15)
    # round 2: Δ = (1, -5); m = 0.5 * (0.5, -3.5) + 0.5 * (1, -5) = (0.75, -4.25); v = 0.5 * (1, 25) + 0.5 * (1, 25)
    # = (1, 25); step = (0.75/2, -4.25/6) = (3/8, -17/24) -> w = (1/4 + 3/8, -7/12 - 17/24) = (5/8, -31/24)
    state = fold(strategy, state, [(3, {"w": f64(1, -5)})], kind="delta", server_round=2)
    torch.testing.assert_close(state["w"], f64(5 / 8, -31 / 24), rtol=0, atol=1e-15)
    saved = strategy.state_dict()
    assert torch.equal(saved["m"]["w"], f64(0.75, -4.25)) and torch.equal(saved["v"]["w"], f64(1, 25))


def test_half_precision_keeps_float32_moments(fold) -> None:
    strategy = FedAdam(eta=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    global_state = {"w": torch.zeros(2, dtype=torch.float16)}
    out = fold(strategy, global_state, [(1, {"w": torch.tensor([1.0, -7.0], dtype=torch.float16)})])
    assert out["w"].dtype == torch.float16
    assert strategy.state_dict()["v"]["w"].dtype == torch.float32
    assert out["w"].tolist() == [0.25, pytest.approx(-7 / 12, abs=1e-3)]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1.0"),
        ({"beta1": -0.5}, "beta1 must be in"),
        ({"tau": -1e-3}, "tau must be in"),
        ({"eta": "fast"}, "eta must be a number, got 'fast'"),
    ],
)
def test_bad_parameters(params: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        FedAdam(**params)  # type: ignore[arg-type]
