"""The worker's logic without the network: training, update kinds, seeds, allow-list, evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedlink.errors import ModelNotAllowed
from fedlink.factory import ModelAllowList
from fedlink.models import mlp
from fedlink.protocol.messages import (
    EvaluateRequest, ModelSpec, OptimizerSpec, StateCache, TrainingPlan, TrainRequest,
)
from fedlink.protocol.tensors import header_of
from fedlink.shards import load_shard
from fedlink.worker.errors import BadRequest, CacheMiss
from fedlink.worker.service import WorkerService, expected_header

MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})


def _service(shard: Path) -> WorkerService:
    return WorkerService(load_shard(shard), allow=ModelAllowList(), worker_id="w0")


def _global() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in mlp(in_features=64, hidden=16, num_classes=10).state_dict().items()}


def _request(update: str = "weights", seed: int = 7, epochs: int = 1, momentum: float = 0.0) -> TrainRequest:
    optimizer = OptimizerSpec(lr=0.1, momentum=momentum)
    plan = TrainingPlan(epochs=epochs, batch_size=16, optimizer=optimizer, update=update, seed=seed)
    return TrainRequest(round=1, task_id="t1", model=MLP, plan=plan)


def test_training_learns_and_reports_metrics(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    start = _global()
    result, weights = service.train(_request(epochs=3, momentum=0.9), start)
    assert result.num_samples == service.shard.num_samples
    assert result.update == "weights" and result.round == 1 and result.task_id == "t1"
    assert 0 <= result.metrics["loss"] < 1.0, "three epochs on digits bring the training loss well below 1"
    assert result.metrics["accuracy"] > 0.8
    assert result.train_seconds > 0
    assert weights.keys() == start.keys()
    assert all(not torch.equal(weights[k], start[k]) for k in start)


def test_same_seed_repeats_bit_for_bit_and_other_seed_differs(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    _, first = service.train(_request(seed=3), _global())
    _, again = service.train(_request(seed=3), _global())
    _, other = service.train(_request(seed=4), _global())
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_delta_is_trained_minus_received(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    start = _global()
    _, weights = service.train(_request("weights"), start)
    _, delta = service.train(_request("delta"), start)
    for name in start:
        torch.testing.assert_close(start[name] + delta[name], weights[name], rtol=0, atol=1e-6)


def test_gradients_are_the_mean_gradient_over_the_shard(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    start = _global()
    result, grads = service.train(_request("gradients"), start)
    model = mlp(in_features=64, hidden=16, num_classes=10)
    model.load_state_dict(start)
    x, y = service.shard.to_tensors()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert grads.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    assert result.num_samples == service.shard.num_samples


def test_disallowed_factory_is_refused_before_import(digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "evil_models_mod.py").write_text("import torch\nIMPORTED = True\ndef model():\n    return torch.nn.Linear(64, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    service = _service(digit_shards[0][0])
    spec = ModelSpec(factory="evil_models_mod:model")
    request = TrainRequest(round=1, task_id="t", model=spec, plan=TrainingPlan())
    with pytest.raises(ModelNotAllowed, match="evil_models_mod:model"):
        service.check_model(spec)
    with pytest.raises(ModelNotAllowed):
        service.train(request, {})
    assert "evil_models_mod" not in sys.modules


def test_allowed_custom_factory_trains(digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab_models_mod.py").write_text("import torch\ndef linear():\n    return torch.nn.Linear(64, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    service = WorkerService(load_shard(digit_shards[0][0]), allow=ModelAllowList(("fedlink.models:*", "lab_models_mod:*")))
    spec = ModelSpec(factory="lab_models_mod:linear")
    header = service.check_model(spec)
    assert [t.name for t in header.tensors] == ["weight", "bias"]
    state = {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}
    result, update = service.train(TrainRequest(round=0, task_id="t", model=spec, plan=TrainingPlan()), state)
    assert result.num_samples > 0 and update["weight"].abs().sum() > 0


def test_expected_header_matches_the_real_model_without_allocating() -> None:
    header = expected_header(MLP, ModelAllowList())
    real = mlp(in_features=64, hidden=16, num_classes=10).state_dict()
    assert [(t.name, tuple(t.shape)) for t in header.tensors] == [(k, tuple(v.shape)) for k, v in real.items()]


def test_wrong_weights_are_a_bad_request(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    state = _global()
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)
    with pytest.raises(BadRequest, match="do not fit"):
        service.train(_request(), state)


def test_evaluate_counts_every_sample(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    result = service.evaluate(EvaluateRequest(round=0, task_id="e", model=MLP, batch_size=50), _global())
    assert result.num_samples == service.shard.num_samples
    assert 0 <= result.accuracy <= 0.3, "an untrained model is near chance on 10 classes"
    assert result.loss > 1.5


def _cached(request: TrainRequest, base: str | None, key: str) -> TrainRequest:
    return request.model_copy(update={"run": "r1", "cache": StateCache(base=base, key=key)})


def test_a_partial_state_is_completed_from_the_kept_one_and_trains_the_same(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    start = _global()
    _, whole = service.train(_cached(_request(seed=3), None, "k.1"), start)
    part = {"1.weight": start["1.weight"]}  # the rest is what the worker kept under k.1
    announced = header_of(part)
    assert service.train_header(_cached(_request(seed=3), "k.1", "k.2"), announced) == announced
    _, again = service.train(_cached(_request(seed=3), "k.1", "k.2"), part)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert service.memory.global_state is not None and service.memory.global_state[1] == "k.2"


def test_a_worker_that_does_not_keep_the_base_says_cache_miss(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    announced = header_of({"1.weight": _global()["1.weight"]})
    with pytest.raises(CacheMiss, match="does not keep global state 'k.9'.*send the whole state") as caught:
        service.train_header(_cached(_request(), "k.9", "k.10"), announced)
    assert caught.value.code == "cache_miss"
    service.train(_cached(_request(), None, "k.1"), _global())
    service.memory.global_state[2]["1.bias"] = torch.zeros(3)  # type: ignore[index]  # kept, but not what it should be
    with pytest.raises(CacheMiss, match=r"no 1.bias float32\[16\]"):
        service.train_header(_cached(_request(), "k.1", "k.2"), announced)
