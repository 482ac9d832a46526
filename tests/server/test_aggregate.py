"""Aggregation arithmetic on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.aggregate import WeightedSum, add_into, add_scaled, non_finite


def test_weighted_mean_by_sample_counts() -> None:
    acc = WeightedSum()
    acc.add({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}, 1)
    acc.add({"w": torch.tensor([4.0, 8.0]), "b": torch.tensor(3.0)}, 2)
    mean = acc.mean()
    # (1*1 + 2*4)/3 = 3, (1*2 + 2*8)/3 = 6, (0 + 6)/3 = 2
    assert torch.equal(mean["w"], torch.tensor([3.0, 6.0]))
    assert torch.equal(mean["b"], torch.tensor(2.0))


def test_integer_and_bool_buffers_stay_in_their_dtype() -> None:
    acc = WeightedSum()
    acc.add({"n": torch.tensor(10), "m": torch.tensor([True, False, True])}, 1)
    acc.add({"n": torch.tensor(13), "m": torch.tensor([False, False, True])}, 2)
    mean = acc.mean()
    # (10 + 26)/3 = 12; majorities: weight 1 of 3 for True -> False, 0 -> False, 3 of 3 -> True
    assert mean["n"].dtype == torch.int64 and int(mean["n"]) == 12
    assert mean["m"].dtype == torch.bool and mean["m"].tolist() == [False, False, True]


def test_half_precision_accumulates_in_float32_and_returns_half() -> None:
    acc = WeightedSum()
    for value in (1.0, 1.0 + 2**-10, 1.0 + 2**-9):
        acc.add({"h": torch.tensor([value], dtype=torch.bfloat16)}, 1)
    mean = acc.mean()
    assert mean["h"].dtype == torch.bfloat16


def test_refuses_bad_weights_and_mismatched_updates() -> None:
    acc = WeightedSum()
    with pytest.raises(ValueError):
        acc.add({"w": torch.zeros(1)}, 0)
    acc.add({"w": torch.zeros(1)}, 1)
    with pytest.raises(ValueError):
        acc.add({"v": torch.zeros(1)}, 1)
    with pytest.raises(ValueError):
        WeightedSum().mean()


def test_add_into_gives_add_scaleds_bits_in_the_updates_own_memory() -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(1000, generator=g), "h": torch.randn(8, generator=g).half(), "n": torch.tensor(3),
            "frozen": torch.ones(2)}
    update = {"w": torch.randn(1000, generator=g) * 1e-3, "h": torch.randn(8, generator=g).half(), "n": torch.tensor(9)}
    update["w"][:3] = torch.tensor([-0.0, 0.0, float("inf")])
    expected = add_scaled(base, update)
    storage = update["w"].data_ptr()
    out = add_into(dict(update), base)
    assert list(out) == list(base) and all(torch.equal(out[k], expected[k]) for k in ("h", "n", "frozen"))
    assert torch.equal(out["w"], expected["w"]) and (out["w"].signbit() == expected["w"].signbit()).all()
    assert out["w"].data_ptr() == storage  # no third model's worth: the delta's memory holds the new model
    assert out["frozen"] is base["frozen"] and out["n"].dtype == torch.int64


def test_add_scaled_and_non_finite() -> None:
    base = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(5)}
    out = add_scaled(base, {"w": torch.tensor([2.0, -2.0]), "n": torch.tensor(7)}, -0.5)
    assert torch.equal(out["w"], torch.tensor([0.0, 2.0])) and int(out["n"]) == 7
    assert non_finite({"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("inf")]), "c": torch.ones(2), "d": torch.tensor(3)}) == ["a", "b"]
