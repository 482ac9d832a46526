"""Multi-Krum (Blanchard et al. 2017): the sample-weighted mean of the m lowest-scoring updates."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.strategy import FedAvg, MultiKrum, TooFewUpdates

# Krum scores with f=1 (see test_krum.py): a 3, b 2, c 6, d 3, e 326.
POINTS = [(0, 0), (1, 0), (0, 2), (1, 1), (10, 10)]
SAMPLES = (1, 2, 7, 1, 7)


def _updates(f64):
    return [(n, {"w": f64(*p), "steps": torch.tensor(4 * i)}) for i, (n, p) in enumerate(zip(SAMPLES, POINTS))]


def test_three_best_by_hand(fold, f64) -> None:
    out = fold(MultiKrum(num_byzantine=1, num_selected=3), {"w": f64(0, 0), "steps": torch.tensor(0)}, _updates(f64))
    # b (2), a (3) and d (3) win; weighted by samples 1, 2, 1: ((0,0) + 2*(1,0) + (1,1)) / 4 = (3/4, 1/4);
    # steps (0*1 + 4*2 + 12*1) / 4 = 5
    assert torch.equal(out["w"], f64(0.75, 0.25))
    assert int(out["steps"]) == 5


def test_selecting_all_is_fedavg(fold, f64) -> None:
    global_state = {"w": f64(0, 0), "steps": torch.tensor(0)}
    out = fold(MultiKrum(num_byzantine=1, num_selected=5), global_state, _updates(f64))
    expected = fold(FedAvg(), global_state, _updates(f64))
    assert torch.equal(out["w"], expected["w"]) and torch.equal(out["steps"], expected["steps"])


def test_selecting_more_than_arrived(fold, f64) -> None:
    strategy = MultiKrum(num_byzantine=1, num_selected=6)
    assert strategy.min_updates == 6
    with pytest.raises(TooFewUpdates, match=r"needs at least 6 updates .*num_selected = 6\), got 5"):
        fold(strategy, {"w": f64(0, 0), "steps": torch.tensor(0)}, _updates(f64))


@pytest.mark.parametrize(
    ("params", "message"),
    [({"num_selected": 0}, "num_selected must be >= 1, got 0"), ({"num_byzantine": -2}, "num_byzantine must be")],
)
def test_bad_parameters(params: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiKrum(**{"num_byzantine": 1, "num_selected": 2, **params})
