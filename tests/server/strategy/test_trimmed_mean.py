"""Coordinate-wise trimmed mean (Yin et al. 2018): drop floor(beta * n) at each end, average the rest."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.errors import NotEnoughWorkers
from fedlink.server.strategy import TooFewUpdates, TrimmedMean

COLUMNS = [(1, -50), (100, 0), (3, 2), (2, 0), (4, 1)]


def test_five_workers_by_hand(fold, f64) -> None:
    samples, steps = (1, 9, 1, 1, 1), (4, 100, 6, 5, 0)
    updates = [(n, {"w": f64(*c), "steps": torch.tensor(s)}) for n, c, s in zip(samples, COLUMNS, steps)]
    out = fold(TrimmedMean(beta=0.2), {"w": f64(0, 0), "steps": torch.tensor(0)}, updates)
    # beta 0.2 of 5 trims 1 at each end, unweighted: {1,2,3,4,100} -> (2+3+4)/3 = 3; {-50,0,0,1,2} -> 1/3;
    # steps (integer) take the lower median of {0,4,5,6,100} -> 5
    torch.testing.assert_close(out["w"], f64(3, 1 / 3))
    assert int(out["steps"]) == 5


def test_beta_zero_is_the_unweighted_mean(fold, f64) -> None:
    out = fold(TrimmedMean(beta=0.0), {"w": f64(0)}, [(1, {"w": f64(1)}), (99, {"w": f64(3)})])
    assert torch.equal(out["w"], f64(2))


def test_deltas_are_added_to_the_global_model(fold, f64) -> None:
    updates = [(1, {"w": f64(*c)}) for c in COLUMNS]
    out = fold(TrimmedMean(beta=0.2), {"w": f64(1, 1)}, updates, kind="delta")
    torch.testing.assert_close(out["w"], f64(4, 4 / 3))


def test_too_few_updates_to_trim_names_the_numbers(fold, f64) -> None:
    strategy = TrimmedMean(beta=0.2)
    assert strategy.min_updates == 5
    message = r"round 3: strategy 'trimmed_mean' needs at least 5 updates .*beta = 0.2.*got 4"
    with pytest.raises(TooFewUpdates, match=message) as info:
        fold(strategy, {"w": f64(0)}, [(1, {"w": f64(i)}) for i in range(4)], server_round=3)
    assert isinstance(info.value, ValueError) and isinstance(info.value, NotEnoughWorkers)


@pytest.mark.parametrize("beta", [0.5, -0.1, 1.0])
def test_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\)"):
        TrimmedMean(beta=beta)
