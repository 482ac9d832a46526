"""The worker operator's policy, without sockets: each rule refuses with its name and flag, files are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlink.factory import ModelAllowList
from fedlink.protocol.messages import (
    EvaluateRequest, HookSpec, ModelSpec, OptimizerSpec, PrivacyPlan, TrainingPlan, TrainRequest,
)
from fedlink.worker.errors import PolicyRefused
from fedlink.worker.policy import PolicyFileError, PolicyGate, WorkerPolicy, load_policy

MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "num_classes": 10, "depth": 0})


def _gate(**policy: object) -> PolicyGate:
    return PolicyGate(WorkerPolicy.model_validate(policy), num_samples=500, allow=ModelAllowList())


def _train(**plan: object) -> TrainRequest:
    return TrainRequest(round=1, task_id="t", model=MLP, plan=TrainingPlan.model_validate(plan))


def test_the_sample_extraction_plan_is_refused_by_default() -> None:
    attack = _train(batch_size=1, max_steps=1, update="delta", optimizer=OptimizerSpec(lr=1.0))
    with pytest.raises(PolicyRefused, match=r"policy min_batch_size \(--min-batch-size\) refused: 1 examples per step"):
        _gate().check(attack)
    _gate().check(_train(batch_size=32))


@pytest.mark.parametrize(
    ("policy", "plan", "rule"),
    [
        ({"min_samples": 100}, {"batch_size": 16, "max_steps": 2}, "min_samples"),
        ({"allowed_updates": ["weights"]}, {"update": "delta"}, "allowed_updates"),
        ({"max_local_steps": 10}, {"batch_size": 16, "epochs": 2}, "max_local_steps"),
        ({"require_secure_aggregation": True}, {}, "require_secure_aggregation"),
        ({"require_dp": True}, {}, "require_dp"),
    ],
)
def test_each_rule_refuses_naming_itself(policy: dict[str, object], plan: dict[str, object], rule: str) -> None:
    with pytest.raises(PolicyRefused, match=f"policy {rule} "):
        _gate(**policy).check(_train(**plan))


def test_required_privacy_is_met_by_the_plan_announcing_it() -> None:
    plan = TrainingPlan(
        hooks=(HookSpec(name="secure_aggregation"),),
        privacy=PrivacyPlan(mode="local", clip_norm=1.0, noise_multiplier=1.0),
    )
    _gate(require_secure_aggregation=True, require_dp=True).check_plan(plan)
    # The local step under a secure-aggregation stage: the request-level rule was the stage's to apply.
    _gate(require_secure_aggregation=True).check_plan(TrainingPlan(), request_level=False)


def test_gradients_cover_the_whole_shard() -> None:
    _gate(min_batch_size=400).check(_train(update="gradients", batch_size=1))
    with pytest.raises(PolicyRefused, match="min_batch_size"):
        _gate(min_batch_size=501).check(_train(update="gradients"))


def test_requests_per_hour_slide() -> None:
    gate = _gate(max_requests_per_hour=2)
    gate.check(_train(), now=0.0)
    gate.check(_train(), now=10.0)
    with pytest.raises(PolicyRefused, match="max_requests_per_hour"):
        gate.check(_train(), now=20.0)
    gate.check(_train(), now=3600.0)


def test_evaluation_only_of_allowed_models() -> None:
    request = EvaluateRequest(round=1, task_id="e", model=MLP)
    _gate().check(request)
    with pytest.raises(PolicyRefused, match=r"policy evaluate_models \(--evaluate-model\)"):
        _gate(evaluate_models=["mylab.models:*"]).check(request)


def test_a_policy_file_is_validated_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("min_batch_size: 64\nallowed_updates: [weights]\n")
    policy = load_policy(path, {"min_samples": 128})
    assert (policy.min_batch_size, policy.min_samples, policy.allowed_updates) == (64, 128, ("weights",))
    path.write_text("min_batch_size: 0\nmax_batch: 3\n")
    with pytest.raises(PolicyFileError) as problem:
        load_policy(path, {})
    assert "min_batch_size = 0" in str(problem.value) and "max_batch = 3: unknown key" in str(problem.value)
    path.write_text("- a list\n")
    with pytest.raises(PolicyFileError, match="expected a mapping"):
        load_policy(path, {})
