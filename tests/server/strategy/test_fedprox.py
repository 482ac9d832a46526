"""FedProx (Li et al. 2020): FedAvg's aggregation, with mu sent to the workers in the training plan."""

from __future__ import annotations

import pytest
import torch

from fedlink.protocol.messages import HookSpec, TrainingPlan
from fedlink.server.errors import ConfigError
from fedlink.server.strategy import FedAvg, FedProx


def test_configure_train_sets_mu_and_nothing_else() -> None:
    plan = TrainingPlan(epochs=3, batch_size=16, update="delta")
    sent = FedProx(mu=0.01).configure_train(1, plan)
    assert sent.hooks == (HookSpec(name="proximal", params={"mu": 0.01}),)
    assert sent.model_copy(update={"hooks": ()}) == plan
    assert plan.hooks == ()  # the plan is frozen; the caller's copy is untouched
    assert FedProx(mu=0).configure_train(1, plan) == plan  # mu 0 is plain FedAvg: no hook to run


def test_aggregates_exactly_like_fedavg(fold, f64) -> None:
    global_state = {"w": f64(0, 0), "steps": torch.tensor(1)}
    updates = [(2, {"w": f64(0.5, 3), "steps": torch.tensor(4)}), (6, {"w": f64(1.5, -1), "steps": torch.tensor(8)})]
    # (2*0.5 + 6*1.5)/8 = 1.25, (2*3 - 6*1)/8 = 0; steps (8 + 48)/8 = 7
    prox = fold(FedProx(mu=0.1), global_state, updates)
    assert torch.equal(prox["w"], f64(1.25, 0)) and int(prox["steps"]) == 7
    avg = fold(FedAvg(), global_state, updates)
    assert all(torch.equal(prox[k], avg[k]) for k in avg)


def test_mu_zero_is_allowed_and_numeric_strings_are_read() -> None:
    assert FedProx(mu=0).mu == 0.0
    assert FedProx(mu="1e-3").mu == 0.001  # type: ignore[arg-type]  # PyYAML reads 1e-3 as a string


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf")])
def test_bad_mu(mu: float) -> None:
    with pytest.raises(ValueError, match="mu must be in"):
        FedProx(mu=mu)


def test_mu_is_required() -> None:
    with pytest.raises(TypeError, match="mu"):
        FedProx()  # type: ignore[call-arg]


def test_gradient_updates_are_refused() -> None:
    with pytest.raises(ConfigError, match="fedprox needs training.update 'weights' or 'delta'"):
        FedProx(mu=0.01).configure_train(1, TrainingPlan(update="gradients"))
