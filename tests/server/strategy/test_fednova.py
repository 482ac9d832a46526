"""FedNova (Wang et al. 2020): normalised averaging by hand, then a job whose workers take 1:2:5 local steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlink.factory import ModelAllowList, build_model
from fedlink.protocol.messages import TrainingPlan
from fedlink.server.errors import ConfigError, InvalidUpdate
from fedlink.server.strategy import ClientUpdate, FedAvg, FedNova
from fedlink.server.strategy.base import Aggregate, as_aggregate
from fedlink.server.strategy.fednova import step_norm
from fedlink.shards import save_shard

from .jobs import run_job


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _round(strategy: FedNova | FedAvg, updates: list[tuple[int, float, torch.Tensor]], kind: str = "weights") -> Aggregate:
    aggregation = strategy.begin_round(1, {"w": _f64(0, 0)})
    for i, (samples, steps, w) in enumerate(updates):
        aggregation.add(ClientUpdate(worker=f"w{i}", kind=kind, num_samples=samples, state={"w": w}, metrics={"steps": steps}))  # type: ignore[arg-type]
    return as_aggregate(aggregation.finish())


def test_step_norm_is_the_papers_a_i() -> None:
    assert step_norm(5) == 5.0
    assert step_norm(1, 0.9) == pytest.approx(1.0)
    # Σ_{k=1..τ} (1 - ρ^k) / (1 - ρ) for τ = 3, ρ = 0.5: (0.5 + 0.75 + 0.875) / 0.5 = 4.25
    assert step_norm(3, 0.5) == pytest.approx(4.25)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        step_norm(0)


def test_equal_steps_average_exactly_like_fedavg() -> None:
    updates = [(2, 10.0, _f64(0.5, 3)), (6, 10.0, _f64(1.5, -1))]
    nova, avg = _round(FedNova(), updates), _round(FedAvg(), updates)
    assert torch.allclose(nova.state["w"], avg.state["w"], rtol=0, atol=1e-15)
    assert nova.metrics["fednova_tau_eff"] == 10.0


def test_unequal_steps_by_hand() -> None:
    # p = (1/4, 3/4), a = (1, 5): τ_eff = 1/4 + 15/4 = 4; Σ p_i Δ_i / a_i = (1/4)(4, 4) + (3/4)(10, -10)/5 = (2.5, -0.5)
    result = _round(FedNova(), [(1, 1.0, _f64(4, 4)), (3, 5.0, _f64(10, -10))])
    assert torch.allclose(result.state["w"], _f64(10, -2))
    assert result.metrics == {"fednova_tau_eff": 4.0, "fednova_steps_max": 5.0, "fednova_steps_min": 1.0}
    delta = _round(FedNova(), [(1, 1.0, _f64(4, 4)), (3, 5.0, _f64(10, -10))], kind="delta")
    assert torch.allclose(delta.state["w"], _f64(10, -2))  # global is zero: a delta is the same change
    halved = _round(FedNova(server_lr=0.5), [(1, 1.0, _f64(4, 4)), (3, 5.0, _f64(10, -10))])
    assert torch.allclose(halved.state["w"], _f64(5, -1))


def test_momentum_of_the_plan_changes_a_i() -> None:
    strategy = FedNova()
    strategy.configure_train(1, TrainingPlan(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.5}))
    # a = (1, 4.25) for steps (1, 3): τ_eff = (1 + 3 * 4.25) / 4
    result = _round(strategy, [(1, 1.0, _f64(1, 0)), (3, 3.0, _f64(0, 4.25))])
    tau_eff = (1 + 3 * 4.25) / 4
    assert torch.allclose(result.state["w"], tau_eff * _f64(0.25, 0.75))


@pytest.mark.parametrize("steps", [None, 0.0, 2.5, float("nan")])
def test_a_result_without_a_usable_step_count_is_refused(steps: float | None) -> None:
    aggregation = FedNova().begin_round(1, {"w": _f64(0)})
    metrics = {} if steps is None else {"steps": steps}
    with pytest.raises(InvalidUpdate, match="local step count"):
        aggregation.add(ClientUpdate(worker="w", kind="weights", num_samples=1, state={"w": _f64(1)}, metrics=metrics))


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (TrainingPlan(update="gradients"), "fednova needs training.update 'weights' or 'delta'"),
        (TrainingPlan(optimizer={"name": "adam", "lr": 0.01}), "fednova needs training.optimizer.name 'sgd'"),
    ],
)
def test_refuses_plans_it_cannot_normalise(plan: TrainingPlan, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedNova().configure_train(1, plan)


def _heterogeneous_logistic_data(folder: Path) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """Three workers with 160, 320 and 800 samples (1, 2 and 5 times the local steps per epoch), each labelled by its
    own logistic model around its own mean: their optima differ, and the pooled objective has a finite optimum."""
    rng = np.random.default_rng(0)
    xs, ys, shards = [], [], []
    for i, n in enumerate((160, 320, 800)):
        w = rng.normal(size=8) * 2
        x = (rng.normal(size=(n, 8)) + rng.normal(size=8)).astype(np.float32)
        y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w)))).astype(np.int64)
        shards.append(save_shard(folder / f"shard-{i}.npy", x, y))
        xs.append(x)
        ys.append(y)
    return shards, torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


LOGISTIC = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 8, "num_classes": 2, "depth": 0}}


def _pooled_loss(state: dict[str, torch.Tensor] | None, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = build_model(LOGISTIC["factory"], LOGISTIC["kwargs"], ModelAllowList())  # type: ignore[arg-type]
    if state is not None:
        model.load_state_dict(state)
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    for _ in range(5):
        optimizer.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


async def test_workers_taking_1_2_and_5_times_the_steps_end_closer_to_the_pooled_optimum(tmp_path: Path) -> None:
    shards, x, y = _heterogeneous_logistic_data(tmp_path)
    optimum = _pooled_loss(None, x, y)
    config = {"rounds": 10, "training": {"epochs": 1, "batch_size": 16, "optimizer": {"lr": 0.05}}}
    gaps = {}
    for name in ("fedavg", "fednova"):
        job = await run_job(shards, tmp_path / name, {**config, "strategy": {"name": name}}, model=LOGISTIC)
        gaps[name] = _pooled_loss(job.coordinator.state, x, y) - optimum
        if name == "fednova":
            assert [h["fednova_steps_min"] for h in job.history] == [10.0] * 10  # 160 / 16
            assert [h["fednova_steps_max"] for h in job.history] == [50.0] * 10  # 800 / 16
    # FedAvg weighs each worker by samples x steps (5x more pull for the big worker than its data deserves) and
    # settles near another objective's optimum; FedNova's normalised average heads for the pooled one.
    assert 0 <= gaps["fednova"] < gaps["fedavg"] / 2, gaps
