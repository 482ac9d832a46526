"""Coordinate-wise median (Yin et al. 2018): unweighted, integer buffers by lower median, bools by majority."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.strategy import ClientUpdate, Median

T, F = True, False


def test_weights_by_hand_ignore_sample_counts(fold, f64) -> None:
    global_state = {"w": f64(0, 0, 0), "steps": torch.tensor(0), "mask": torch.tensor([F, F])}
    updates = [
        (1, {"w": f64(1, 5, 3), "steps": torch.tensor(4), "mask": torch.tensor([T, F])}),
        (1000, {"w": f64(2, 0, 9), "steps": torch.tensor(9), "mask": torch.tensor([T, T])}),
        (1, {"w": f64(7, 4, 4), "steps": torch.tensor(5), "mask": torch.tensor([F, F])}),
    ]
    out = fold(Median(), global_state, updates)
    # w: {1,2,7} -> 2, {5,0,4} -> 4, {3,9,4} -> 4 (the 1000 samples do not pull it); steps: {4,9,5} -> 5;
    # mask: 2 of 3 True -> True, 1 of 3 -> False
    assert torch.equal(out["w"], f64(2, 4, 4))
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 5
    assert torch.equal(out["mask"], torch.tensor([T, F]))


def test_even_count_and_deltas(fold, f64) -> None:
    updates = [(1, {"w": f64(1, -1)}), (1, {"w": f64(10, 0)}), (1, {"w": f64(2, 8)}), (1, {"w": f64(4, 2)})]
    # median delta: {1,2,4,10} -> (2+4)/2 = 3; {-1,0,2,8} -> (0+2)/2 = 1; added to (1, 1)
    out = fold(Median(), {"w": f64(1, 1)}, updates, kind="delta")
    assert torch.equal(out["w"], f64(4, 2))


def test_gradients_take_the_server_sgd_step(fold, f64) -> None:
    grads = [(1, {"w": f64(1, 100)}), (1, {"w": f64(3, -2)}), (1, {"w": f64(2, 0)})]
    # median gradient (2, 0); w = (1, 1) - 0.5 * (2, 0) = (0, 1); the buffer stays
    out = fold(Median(server_lr=0.5), {"w": f64(1, 1), "steps": torch.tensor(3)}, grads, kind="gradients")
    assert torch.equal(out["w"], f64(0, 1)) and int(out["steps"]) == 3


def test_one_update_is_its_own_median(fold, f64) -> None:
    assert torch.equal(fold(Median(), {"w": f64(0)}, [(5, {"w": f64(0.3)})])["w"], f64(0.3))


def test_errors(f64) -> None:
    with pytest.raises(ValueError, match="no updates"):
        Median().begin_round(1, {"w": f64(0)}).finish()
    aggregation = Median().begin_round(1, {"w": f64(0)})
    aggregation.add(ClientUpdate(worker="a", kind="delta", num_samples=1, state={"w": f64(1)}))
    with pytest.raises(ValueError, match="mixed update kinds"):
        aggregation.add(ClientUpdate(worker="b", kind="weights", num_samples=1, state={"w": f64(1)}))
    with pytest.raises(ValueError, match="server_momentum must be in"):
        Median(server_momentum=2.0)
