"""SCAFFOLD (Karimireddy et al. 2020): the server's side by hand, then whole jobs over in-memory workers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlink.protocol.messages import HookSpec, TrainingPlan
from fedlink.protocol.tensors import header_of
from fedlink.server.checkpoint import flatten_tensors, unflatten_tensors
from fedlink.server.errors import ConfigError
from fedlink.server.strategy import ClientUpdate, Scaffold, build_strategy
from fedlink.server.strategy.base import Aggregate

from .jobs import label_skewed_digits, run_job


def _round(strategy: Scaffold, global_state: dict[str, torch.Tensor], updates: list[tuple[str, int, dict[str, torch.Tensor], dict[str, float]]], server_round: int = 1) -> Aggregate:
    aggregation = strategy.begin_round(server_round, global_state)
    for worker, samples, state, metrics in updates:
        aggregation.add(ClientUpdate(worker=worker, kind="weights", num_samples=samples, state=state, metrics=metrics))
    result = aggregation.finish()
    assert isinstance(result, Aggregate)
    return result


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_configure_train_names_the_hook_with_the_rounds_learning_rate() -> None:
    plan = TrainingPlan(epochs=2, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.5})
    sent = Scaffold().configure_train(3, plan)
    assert sent.hooks == (HookSpec(name="scaffold", params={"lr": 0.05, "momentum": 0.5}),)
    assert sent.model_copy(update={"hooks": ()}) == plan


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (TrainingPlan(update="gradients"), "scaffold needs training.update 'weights' or 'delta'"),
        (TrainingPlan(optimizer={"name": "adam", "lr": 0.01}), "scaffold needs training.optimizer.name 'sgd', got 'adam'"),
    ],
)
def test_refuses_plans_without_sgd_steps(plan: TrainingPlan, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Scaffold().configure_train(1, plan)


def test_bad_parameters_name_the_value() -> None:
    with pytest.raises(ConfigError, match="server_lr must be in"):
        build_strategy("scaffold", {"server_lr": 0})
    with pytest.raises(ConfigError, match="num_workers must be >= 1"):
        build_strategy("scaffold", {"num_workers": 0})


def test_one_round_by_hand() -> None:
    strategy = Scaffold()
    global_state = {"w": _f64(0, 0), "steps": torch.tensor(1)}
    assert torch.equal(strategy.control(header_of({"w": global_state["w"]}))["w"], _f64(0, 0))  # c starts at zero
    result = _round(strategy, global_state, [
        ("a", 1, {"w": _f64(1, 2), "steps": torch.tensor(3), "scaffold/delta_c/w": _f64(0.5, 0)}, {}),
        ("b", 3, {"w": _f64(3, -2), "steps": torch.tensor(3), "scaffold/delta_c/w": _f64(0.1, 0.2)}, {}),
    ])
    # x: the sample-weighted mean, (1*1 + 3*3)/4 = 2.5 and (2 - 6)/4 = -1; the Δc never reach the model
    assert set(result.state) == {"w", "steps"}
    assert torch.equal(result.state["w"], _f64(2.5, -1)) and int(result.state["steps"]) == 3
    # c = (1/N) Σ c_i with N = the 2 workers seen: (0.6, 0.2) / 2
    assert torch.allclose(strategy.control(header_of({"w": global_state["w"]}))["w"], _f64(0.3, 0.1))
    assert result.metrics["scaffold_lost_state"] == 0.0
    assert result.metrics["scaffold_c_norm"] == pytest.approx(float(_f64(0.3, 0.1).norm()))


def test_server_lr_and_a_known_federation_size() -> None:
    strategy = Scaffold(server_lr=0.5, num_workers=4)
    result = _round(strategy, {"w": _f64(0, 0)}, [
        ("a", 1, {"w": _f64(1, 2), "scaffold/delta_c/w": _f64(0.5, 0)}, {}),
        ("b", 3, {"w": _f64(3, -2), "scaffold/delta_c/w": _f64(0.1, 0.2)}, {}),
    ])
    assert torch.equal(result.state["w"], _f64(1.25, -0.5))
    assert torch.allclose(strategy.control(header_of({"w": _f64(0, 0)}))["w"], _f64(0.15, 0.05))  # (0.6, 0.2) / 4
    # Round 2: only "a" answers; c keeps b's share: (0.6 + 0.2, 0.2 - 0.2) / 4
    _round(strategy, {"w": _f64(0, 0)}, [("a", 1, {"w": _f64(0, 0), "scaffold/delta_c/w": _f64(0.2, -0.2)}, {})], 2)
    assert torch.allclose(strategy.control(header_of({"w": _f64(0, 0)}))["w"], _f64(0.2, 0.0))


def test_a_worker_that_lost_its_control_variate_is_warned_about_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    strategy = Scaffold()
    first = {"w": _f64(1), "scaffold/delta_c/w": _f64(1)}
    _round(strategy, {"w": _f64(0)}, [("a", 1, first, {"scaffold_fresh": 1.0}), ("b", 1, first, {"scaffold_fresh": 1.0})])
    with caplog.at_level(logging.WARNING, logger="fedlink.server"):
        result = _round(strategy, {"w": _f64(0)}, [
            ("a", 1, first, {"scaffold_fresh": 1.0}),  # a took part in round 1: it restarted since
            ("c", 1, first, {"scaffold_fresh": 1.0}),  # c is new: starting from zero is expected
        ], 2)
    assert result.metrics["scaffold_lost_state"] == 1.0
    assert [r.getMessage() for r in caplog.records] == [
        "round 2: worker 'a' has lost its SCAFFOLD control variate (restarted?); it starts again from zero"
    ]


def test_state_round_trips_through_a_checkpoint_and_snapshots_stay_valid() -> None:
    strategy = Scaffold()
    update = {"w": _f64(1, 1), "scaffold/delta_c/w": _f64(0.5, -0.5)}
    _round(strategy, {"w": _f64(0, 0)}, [("b", 1, update, {}), ("a", 1, update, {})])
    snapshot = strategy.state_dict()
    skeleton, tensors = flatten_tensors(snapshot)
    _round(strategy, {"w": _f64(0, 0)}, [("a", 1, update, {})], 2)  # must not change the snapshot's tensors
    assert torch.equal(snapshot["sum_c"]["w"], _f64(1, -1)) and snapshot["seen"] == ["a", "b"]
    restored = Scaffold()
    restored.load_state_dict(unflatten_tensors(skeleton, tensors))
    assert restored.state_dict()["seen"] == ["a", "b"]
    assert torch.equal(restored.control(header_of({"w": _f64(0, 0)}))["w"], _f64(0.5, -0.5))
    assert Scaffold().state_dict() == {}
    with pytest.raises(ValueError, match="unexpected state keys"):
        Scaffold().load_state_dict({"sum_c": {}, "moments": {}})
    with pytest.raises(ValueError, match="list of worker ids"):
        Scaffold().load_state_dict({"seen": "a"})


async def test_scaffold_beats_fedavg_on_label_skewed_digits(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    shards, test = label_skewed_digits(tmp_path, digits, workers=5, classes=2)
    config: dict[str, Any] = {
        "rounds": 12, "sampling": {"fraction": 0.6, "min_workers": 3},
        "training": {"epochs": 2, "batch_size": 16, "optimizer": {"lr": 0.05}},
        "evaluation": {"data": str(test)},
    }
    fedavg = await run_job(shards, tmp_path / "fedavg", {**config, "strategy": {"name": "fedavg"}})
    scaffold = await run_job(shards, tmp_path / "scaffold", {**config, "strategy": {"name": "scaffold"}})
    fedavg_acc = [h["accuracy"] for h in fedavg.history]
    scaffold_acc = [h["accuracy"] for h in scaffold.history]
    # Mean accuracy over the last four rounds: the skewed split makes single rounds noisy.
    assert np.mean(scaffold_acc[-4:]) > np.mean(fedavg_acc[-4:]) + 0.1, (fedavg_acc, scaffold_acc)
    assert all(h["scaffold_lost_state"] == 0 for h in scaffold.history)
    # Every worker that trained reported whether it had a control variate; each started from zero once.
    workers = scaffold.trained_metrics()
    assert {w: sum(m.get("scaffold_fresh", 0.0) for m in ms) for w, ms in workers.items()} == {w: 1.0 for w in workers}
