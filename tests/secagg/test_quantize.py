from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlink.models import mnist_cnn
from fedlink.secagg.errors import InvalidUpdate, SecAggConfigError
from fedlink.secagg.quantize import QuantSpec, decode_sum, encode_update, layout_of

STATE = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}
LAYOUT = layout_of(STATE, metrics=("loss",))


def _sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total: np.ndarray = (np.stack(vectors).astype(np.uint64).sum(axis=0) % (1 << bits)).astype(np.uint32)
    return total


def test_layout_skips_integer_buffers_and_counts_extras() -> None:
    assert LAYOUT.tensors == (("w", (2, 3)), ("b", (3,)))
    assert (LAYOUT.update_length, LAYOUT.length) == (9, 11)
    assert layout_of(mnist_cnn().state_dict()).update_length == 225_034


def test_weighted_mean_update_and_metrics_survive_the_round_trip() -> None:
    spec = QuantSpec.for_workers(3, bits=32, clip_norm=10.0, weight_cap=1000)
    updates = [{"w": torch.full((2, 3), 0.1 * (i + 1)), "b": torch.tensor([1.0, -2.0, 0.5]) * i} for i in range(3)]
    samples, losses = [100, 300, 600], [1.0, 2.0, 4.0]
    vectors = [
        encode_update(u, num_samples=n, metrics={"loss": m}, layout=LAYOUT, spec=spec)
        for u, n, m in zip(updates, samples, losses)
    ]
    aggregate = decode_sum(_sum(vectors, 32), layout=LAYOUT, spec=spec)
    for name in ("w", "b"):
        expected = torch.stack([u[name] * n for u, n in zip(updates, samples)]).sum(0) / 1000
        assert torch.allclose(aggregate.update[name], expected, atol=1e-6)
    assert aggregate.weight == pytest.approx(1000, abs=1e-4)
    assert aggregate.metrics["loss"] == pytest.approx((100 + 600 + 2400) / 1000, abs=1e-4)


def test_updates_are_clipped_to_the_l2_norm_and_samples_to_the_cap() -> None:
    spec = QuantSpec.for_workers(1, bits=32, clip_norm=1.0, weight_cap=50)
    big = {"w": torch.full((2, 3), 10.0), "b": torch.zeros(3)}
    vector = encode_update(big, num_samples=500, metrics={"loss": 5e6}, layout=LAYOUT, spec=spec)
    aggregate = decode_sum(vector, layout=LAYOUT, spec=spec)
    assert float(aggregate.update["w"].norm()) == pytest.approx(1.0, abs=1e-6)
    assert aggregate.weight == pytest.approx(50, abs=1e-4)
    assert aggregate.metrics["loss"] == pytest.approx(spec.metric_bound, rel=1e-6)


def test_extremes_of_every_contributor_do_not_wrap() -> None:
    bits, n = 8, 5
    spec = QuantSpec.for_workers(n, bits=bits, clip_norm=1.0, weight_cap=1)
    assert n * spec.levels < 1 << (bits - 1)
    for sign in (1.0, -1.0):
        one_hot = {"w": torch.zeros(2, 3), "b": torch.tensor([sign, 0.0, 0.0])}
        vector = encode_update(one_hot, num_samples=1, metrics={"loss": sign * 1e9}, layout=LAYOUT, spec=spec)
        aggregate = decode_sum(_sum([vector] * n, bits), layout=LAYOUT, spec=spec)
        assert float(aggregate.update["b"][0]) == sign
        assert aggregate.metrics["loss"] == pytest.approx(sign * spec.metric_bound)


def test_stochastic_rounding_is_unbiased() -> None:
    spec = QuantSpec(bits=16, clip_norm=1.0, levels=4, contributors=1, weight_cap=1)
    layout = layout_of({"x": torch.zeros(20_000)})
    update = {"x": torch.full((20_000,), 0.3 / math.sqrt(20_000))}  # 0.3/sqrt(n) * 4 levels: between 0 and 1
    vector = encode_update(update, num_samples=1, metrics={}, layout=layout, spec=spec)
    assert set(vector[:-1].tolist()) == {0, 1}
    expected = 0.3 / math.sqrt(20_000) * 4
    assert abs(vector[:-1].mean() - expected) < 5 * math.sqrt(expected / 20_000)


def test_a_setting_that_could_overflow_is_refused() -> None:
    with pytest.raises(SecAggConfigError, match="10 workers x 214748365 levels can overflow 2\\^32"):
        QuantSpec(bits=32, clip_norm=1.0, levels=214_748_365, contributors=10, weight_cap=1)
    QuantSpec(bits=32, clip_norm=1.0, levels=214_748_364, contributors=10, weight_cap=1)
    with pytest.raises(SecAggConfigError, match="bits = 4 leaves no room for 9 workers"):
        QuantSpec.for_workers(9, bits=4, clip_norm=1.0, weight_cap=1)


@pytest.mark.parametrize(
    ("update", "metrics", "message"),
    [
        ({"w": torch.zeros(2, 3)}, {"loss": 0.0}, "tensor 'b': expected shape \\(3,\\), got None"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, {"loss": 0.0}, "tensor 'w'"),
        ({"w": torch.full((2, 3), math.nan), "b": torch.zeros(3)}, {"loss": 0.0}, "NaN"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, {}, "metrics"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, {"loss": math.inf}, "metric 'loss'"),
    ],
)
def test_bad_updates_are_refused(update: dict[str, torch.Tensor], metrics: dict[str, float], message: str) -> None:
    spec = QuantSpec.for_workers(2, bits=32, clip_norm=1.0, weight_cap=1)
    with pytest.raises(InvalidUpdate, match=message):
        encode_update(update, num_samples=1, metrics=metrics, layout=LAYOUT, spec=spec)


def test_a_sum_without_weight_is_refused() -> None:
    spec = QuantSpec.for_workers(2, bits=32, clip_norm=1.0, weight_cap=1)
    with pytest.raises(InvalidUpdate, match="summed weight is zero"):
        decode_sum(np.zeros(LAYOUT.length, dtype=np.uint32), layout=LAYOUT, spec=spec)
