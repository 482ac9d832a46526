"""Krum (Blanchard et al. 2017): the update with the smallest summed distance to its n - f - 2 neighbours."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.strategy import Krum, TooFewUpdates

# Squared distances: ab=1 ac=4 ad=2 ae=200 bc=5 bd=1 be=181 cd=2 ce=164 de=162. With f=1 the score of each point
# sums its 2 nearest: a 1+2=3, b 1+1=2, c 2+4=6, d 1+2=3, e 162+164=326 -> Krum picks b = (1, 0).
POINTS = [(0, 0), (1, 0), (0, 2), (1, 1), (10, 10)]


def _updates(f64, samples=(1, 1, 1, 1, 1)):
    return [(n, {"w": f64(*p), "steps": torch.tensor(10 * i)}) for i, (n, p) in enumerate(zip(samples, POINTS))]


def test_picks_the_most_central_update_whole(fold, f64) -> None:
    out = fold(Krum(num_byzantine=1), {"w": f64(0, 0), "steps": torch.tensor(0)}, _updates(f64, (1, 1, 1, 1, 500)))
    assert torch.equal(out["w"], f64(1, 0))
    assert int(out["steps"]) == 10  # b's own buffer, not an average; e's 500 samples buy it nothing


def test_on_deltas_and_gradients(fold, f64) -> None:
    updates = [(1, {"w": f64(*p)}) for p in POINTS]
    # b's delta (1, 0) is added: (6, 5); b's gradient takes a step of 2: (5, 5) - 2 * (1, 0) = (3, 5)
    delta = fold(Krum(num_byzantine=1), {"w": f64(5, 5)}, updates, kind="delta")
    assert torch.equal(delta["w"], f64(6, 5))
    grads = fold(Krum(num_byzantine=1, server_lr=2.0), {"w": f64(5, 5)}, updates, kind="gradients")
    assert torch.equal(grads["w"], f64(3, 5))


def test_needs_more_than_2f_plus_2_updates(fold, f64) -> None:
    strategy = Krum(num_byzantine=1)
    assert strategy.min_updates == 5
    message = r"'krum' needs at least 5 updates \(n > 2f \+ 2 with num_byzantine f = 1\), got 4"
    with pytest.raises(TooFewUpdates, match=message):
        fold(strategy, {"w": f64(0, 0), "steps": torch.tensor(0)}, _updates(f64)[:4])
    assert Krum(num_byzantine=0).min_updates == 3


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_num_byzantine(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="num_byzantine must be"):
        Krum(num_byzantine=value)  # type: ignore[arg-type]


def test_num_byzantine_is_required() -> None:
    with pytest.raises(TypeError, match="num_byzantine"):
        Krum()  # type: ignore[call-arg]
