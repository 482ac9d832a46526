"""FedBuff (Nguyen et al. 2022): the buffer average of staleness-weighted deltas, applied with server_lr."""

from __future__ import annotations

import pytest
import torch

from fedlink.protocol.messages import TrainingPlan
from fedlink.server.errors import ConfigError
from fedlink.server.strategy import ClientUpdate, FedBuff, build_strategy


def _add(strategy: FedBuff, global_state: dict[str, torch.Tensor], deltas: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    aggregation = strategy.begin_round(1, global_state)
    for i, (staleness, delta) in enumerate(deltas):
        aggregation.add(ClientUpdate(worker=f"w{i}", kind="delta", num_samples=10, state=delta, staleness=staleness))
    result = aggregation.finish()
    assert isinstance(result, dict)
    return result


def test_buffer_average_with_polynomial_staleness(f64) -> None:  # type: ignore[no-untyped-def]
    global_state = {"w": f64(1.0, 1.0), "steps": torch.tensor(5)}
    deltas = [(0, {"w": f64(3.0, 0.0), "steps": torch.tensor(2)}), (3, {"w": f64(0.0, 4.0), "steps": torch.tensor(4)})]
    out = _add(FedBuff(buffer_size=2, server_lr=0.5), global_state, deltas)
    # s(0) = 1, s(3) = 1/2: x + 0.5 * (1/2) * (1 * [3, 0] + 0.5 * [0, 4]) = [1.75, 1.5]
    assert torch.allclose(out["w"], f64(1.75, 1.5), rtol=0, atol=1e-12)
    assert int(out["steps"]) == 3, "integer buffers: the staleness-weighted mean of the values sent, rounded"


def test_constant_staleness_is_a_plain_buffer_mean(f64) -> None:  # type: ignore[no-untyped-def]
    out = _add(FedBuff(buffer_size=2, staleness="constant"), {"w": f64(0.0)}, [(0, {"w": f64(2.0)}), (9, {"w": f64(4.0)})])
    assert torch.equal(out["w"], f64(3.0))


def test_weights_and_refusals() -> None:
    strategy = FedBuff()
    assert strategy.staleness_weight(0) == 1.0 and strategy.staleness_weight(3) == 0.5
    with pytest.raises(ValueError, match="negative"):
        strategy.staleness_weight(-1)
    with pytest.raises(ConfigError, match="training.update 'delta'"):
        strategy.configure_train(1, TrainingPlan(update="weights"))
    with pytest.raises(ConfigError, match="buffer_size must be >= 1"):
        build_strategy("fedbuff", {"buffer_size": 0})
    with pytest.raises(ConfigError, match="staleness must be"):
        build_strategy("fedbuff", {"staleness": "linear"})
    assert build_strategy("fedbuff", {"buffer_size": 5}).asynchronous  # type: ignore[attr-defined]


def test_the_server_update_in_the_means_own_memory_has_the_reference_bits() -> None:
    """float32 steps in the mean's own memory, float16 in float32 as before, integers take the mean: every tensor
    has exactly the bits of ``global + mean * scale`` computed out of place, and the global model is untouched."""
    from fedlink.server.aggregate import WeightedSum, accumulator_dtype

    generator = torch.Generator().manual_seed(4)
    global_state = {
        "w": torch.randn(64, 33, generator=generator),
        "h": torch.randn(50, generator=generator).half(),
        "z": torch.tensor([-0.0, 0.0, -0.0, 1.0]),
        "steps": torch.tensor(7),
    }
    kept = {name: value.clone() for name, value in global_state.items()}
    deltas = [
        (staleness, {"w": torch.randn(64, 33, generator=generator) * 1e-3, "h": torch.randn(50, generator=generator).half(),
                     "z": torch.tensor([0.0, -0.0, -0.0, 2.0]), "steps": torch.tensor(staleness)})
        for staleness in (0, 2, 5)
    ]
    strategy = FedBuff(buffer_size=3, server_lr=0.7)
    out = _add(strategy, global_state, deltas)

    reference_sum = WeightedSum()
    for staleness, delta in deltas:
        reference_sum.add(delta, strategy.staleness_weight(staleness))
    scale = 0.7 * reference_sum.total_weight / reference_sum.count
    mean = reference_sum.mean()
    reference = {  # out of place, in accumulator precision: what the server update computed before it was in place
        name: (base.to(accumulator_dtype(base.dtype)) + mean[name].to(accumulator_dtype(base.dtype)) * scale).to(base.dtype)
        if base.is_floating_point() else mean[name].to(base.dtype)
        for name, base in global_state.items()
    }
    assert list(out) == list(reference)
    for name in reference:
        assert out[name].dtype == reference[name].dtype
        assert torch.equal(out[name].view(-1).view(torch.uint8), reference[name].view(-1).view(torch.uint8)), name
        assert torch.equal(global_state[name], kept[name]) and out[name].data_ptr() != global_state[name].data_ptr()
