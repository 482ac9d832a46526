"""Local DP on a worker, in process: DP-SGD in place of the loop, the per-run accountant, budget and refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedlink.factory import ModelAllowList, build_model
from fedlink.privacy import ModelNotPrivatizable, compute_epsilon
from fedlink.protocol.messages import ModelSpec, OptimizerSpec, PrivacyPlan, TrainingPlan, TrainRequest
from fedlink.shards import load_shard
from fedlink.worker.errors import PolicyRefused
from fedlink.worker.policy import PolicyGate, WorkerPolicy
from fedlink.worker.service import WorkerService

MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})
Z = 1.2


def _plan(mode: str = "local", **extra: object) -> TrainingPlan:
    privacy = PrivacyPlan(mode=mode, clip_norm=1.0, noise_multiplier=Z, **extra)  # type: ignore[arg-type]
    return TrainingPlan(batch_size=32, optimizer=OptimizerSpec(lr=0.5), update="delta", privacy=privacy)


def _request(plan: TrainingPlan, server_round: int, model: ModelSpec = MLP) -> TrainRequest:
    return TrainRequest(round=server_round, task_id=f"t{server_round}", model=model, plan=plan, run="run-a")


def _state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach() for k, v in build_model(spec.factory, spec.kwargs, ModelAllowList(("*",))).state_dict().items()}


def test_local_dp_reports_the_epsilon_of_every_step_taken_for_the_run(digit_shards: tuple[list[Path], Path]) -> None:
    shard = load_shard(digit_shards[0][0])
    service = WorkerService(shard, allow=ModelAllowList(), worker_id="w")
    n = shard.num_samples
    q, steps = 32 / n, math.ceil(n / 32)
    first, update = service.train(_request(_plan(), 1), _state(MLP))
    second, _ = service.train(_request(_plan(), 2), _state(MLP))
    assert first.metrics["epsilon"] == pytest.approx(compute_epsilon([(Z, q, steps)], 1e-5), rel=1e-9)
    assert second.metrics["epsilon"] == pytest.approx(compute_epsilon([(Z, q, 2 * steps)], 1e-5), rel=1e-9)
    assert first.metrics["steps"] == steps and first.num_samples == n
    assert any(float(v.abs().sum()) > 0 for v in update.values() if v.is_floating_point())


def test_max_epsilon_refuses_the_round_that_would_pass_it(digit_shards: tuple[list[Path], Path]) -> None:
    shard = load_shard(digit_shards[0][0])
    n = shard.num_samples
    q, steps = 32 / n, math.ceil(n / 32)
    one, two = (compute_epsilon([(Z, q, steps * r)], 1e-5) for r in (1, 2))
    policy = WorkerPolicy(max_epsilon=(one + two) / 2)
    service = WorkerService(shard, allow=ModelAllowList(), worker_id="w", policy=policy)
    service.train(_request(_plan(), 1), _state(MLP))
    with pytest.raises(PolicyRefused, match=r"--max-epsilon\) refused: round 2 would raise") as refused:
        service.train(_request(_plan(), 2), _state(MLP))
    assert refused.value.code == "policy_refused"


def test_batchnorm_models_are_refused_with_the_reason(digit_shards: tuple[list[Path], Path]) -> None:
    shard = load_shard(digit_shards[0][0])
    spec = ModelSpec(factory="torch.nn:BatchNorm1d", kwargs={"num_features": 64})
    service = WorkerService(shard, allow=ModelAllowList(("torch.nn:BatchNorm1d",)), worker_id="w")
    with pytest.raises(ModelNotPrivatizable, match="BatchNorm.*GroupNorm"):
        service.train(_request(_plan(), 1, spec), _state(spec))


def test_require_dp_checks_the_plan_and_the_accepted_modes() -> None:
    plain = TrainingPlan(batch_size=32)
    gate = PolicyGate(WorkerPolicy(require_dp=True), num_samples=500, allow=ModelAllowList())
    with pytest.raises(PolicyRefused, match=r"require_dp \(--require-dp\) refused: the round does not use"):
        gate.check_plan(plain)
    gate.check_plan(_plan("central"))
    gate.check_plan(_plan("local"))
    local_only = PolicyGate(WorkerPolicy(require_dp=True, dp_modes=("local",)), num_samples=500, allow=ModelAllowList())
    with pytest.raises(PolicyRefused, match=r"--dp-mode\) refused: the round uses central"):
        local_only.check_plan(_plan("central"))
    local_only.check_plan(_plan("local"))


def test_plans_without_privacy_keep_their_wire_form() -> None:
    from fedlink.protocol.frames import encode_message

    request = _request(TrainingPlan(batch_size=32), 1)
    assert b"privacy" not in encode_message(request)
