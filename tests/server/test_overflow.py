"""Overflow poisoning and self-reported weight, without sockets: the fold, the norm, the weight caps, and the
coordinator refusing a round whose new model is not finite (in-memory workers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.protocol.messages import TrainingPlan
from fedlink.protocol.tensors import State
from fedlink.server.aggregate import AccumulatorOverflow, WeightedSum, update_norm
from fedlink.server.checkpoint import load_checkpoint
from fedlink.server.errors import RoundRefused
from fedlink.server.strategy import Aggregation, FedAvg
from fedlink.server.strategy.base import Aggregate, RoundContext, as_aggregate
from fedlink.server.train_stage import fold_weights, share_cap

from .inmemory_jobs import coordinator_for, in_memory_workers

BIG = 3e38


def _sum(updates: list[tuple[dict[str, torch.Tensor], float]]) -> WeightedSum:
    total = WeightedSum()
    for state, weight in updates:
        total.add(state, weight)
    return total


def test_normal_updates_fold_bit_for_bit_as_plain_float32_arithmetic() -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(1000, generator=g), "n": torch.tensor(3)} for _ in range(5)]
    weights = [17.0, 3.0, 250.0, 1.0, 9.0]
    expected = states[0]["w"] * weights[0]
    for state, weight in zip(states[1:], weights[1:]):
        expected.add_(state["w"], alpha=weight)
    mean = _sum(list(zip(states, weights))).mean()
    assert torch.equal(mean["w"], expected / sum(weights))


@pytest.mark.parametrize("position", [0, 1, 2])
def test_an_update_that_would_overflow_is_refused_and_leaves_the_sum_exactly_as_it_was(position: int) -> None:
    g = torch.Generator().manual_seed(1)
    honest = [{"w": torch.randn(64, generator=g)} for _ in range(2)]
    poison = {"w": torch.full((64,), BIG)}
    clean = _sum([(s, 100.0) for s in honest]).mean()
    total = WeightedSum()
    order = list(honest)
    order.insert(position, poison)
    for state in order:
        try:
            total.add(state, 100.0)
        except AccumulatorOverflow as exc:
            assert state is poison and "'w'" in str(exc)
    assert total.count == 2
    assert torch.equal(total.mean()["w"], clean["w"])


def test_large_values_that_still_fit_are_folded_in_float64_instead_of_refused() -> None:
    total = _sum([({"w": torch.full((4,), 2e38)}, 1.0), ({"w": torch.full((4,), -2e38)}, 1.0), ({"w": torch.ones(4)}, 2.0)])
    mean = total.mean()["w"]
    assert torch.isfinite(mean).all()
    assert torch.allclose(mean, torch.full((4,), 0.5))


def test_update_norm_is_float64_over_floating_tensors_only() -> None:
    state = {"a": torch.full((4,), BIG), "b": torch.tensor([3.0, 4.0]), "steps": torch.tensor(10**9)}
    assert update_norm({"b": state["b"], "steps": state["steps"]}) == 5.0
    assert math.isclose(update_norm(state), math.sqrt(4 * BIG**2 + 25), rel_tol=1e-6)
    assert update_norm({"a": torch.tensor([float("nan")])}) == math.inf


def test_share_cap_water_fills_the_largest_claims() -> None:
    assert share_cap([10**18, 100, 100], 0.5) == 200
    assert share_cap([100, 100, 100], 0.5) == math.inf
    assert share_cap([10**18, 100], 0.5) == math.inf, "two workers: the default rule does not apply"
    cap = share_cap([10**18, 10**17, 300, 100], 0.4)
    weights = [min(c, cap) for c in (10**18, 10**17, 300, 100)]
    assert max(weights) / sum(weights) == pytest.approx(0.4)


class _Selected:
    def __init__(self, name: str, num_samples: int) -> None:
        self.name, self.num_samples = name, num_samples


def test_fold_weights_apply_configured_caps_the_plan_and_the_share() -> None:
    workers: Any = [_Selected("a", 500), _Selected("b", 500), _Selected("liar", 10**18)]
    plan = TrainingPlan(batch_size=32)
    assert fold_weights(workers, plan=plan, max_samples={}, max_weight_share=0.5) == {"a": 500, "b": 500, "liar": 1000}
    assert fold_weights(workers, plan=plan, max_samples={"liar": 400}, max_weight_share=0.5)["liar"] == 400
    steps = TrainingPlan(batch_size=32, max_steps=2)
    assert fold_weights(workers, plan=steps, max_samples={}, max_weight_share=1.0) == {"a": 64, "b": 64, "liar": 64}


class _Explodes(FedAvg):
    """Round 2's model comes out infinite: what an overflow that slipped through would look like."""

    name = "explodes"

    def start_round(self, context: RoundContext, global_state: State) -> Aggregation:
        inner = super().start_round(context, global_state)
        explode = context.server_round == 2

        class Wrapped(Aggregation):
            def add(self, update: Any) -> None:
                inner.add(update)

            def finish(self) -> Aggregate:
                state = dict(as_aggregate(inner.finish()).state)
                if explode:
                    state = {k: v * math.inf if v.is_floating_point() else v for k, v in state.items()}
                return Aggregate(state)

        return Wrapped()


async def test_a_round_whose_new_model_is_not_finite_is_refused_and_the_checkpoint_stands(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    async with in_memory_workers(digit_shards[0]) as remotes:
        coordinator = coordinator_for(remotes, {
            "name": "refuse", "seed": 3, "rounds": 3, "output": str(tmp_path / "run"),
            "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}},
            "strategy": {"name": f"{__name__}:_Explodes"}, "timeouts": {"round_retries": 1},
        })
        with pytest.raises(RoundRefused, match="round 2: the aggregated model has NaN or infinite values"):
            await coordinator.run()
    assert all(torch.isfinite(t).all() for t in coordinator.state.values() if t.is_floating_point())
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert checkpoint is not None and checkpoint.server_round == 1
    assert all(torch.equal(checkpoint.state[k], coordinator.state[k]) for k in coordinator.state)
