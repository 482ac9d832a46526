"""The worker's logic without the network: training, update kinds, seeds, allow-list, evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedlink.errors import ModelNotAllowed
from fedlink.factory import ModelAllowList
from fedlink.models import mlp, sized_mlp
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


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a worker receives is its own: training may take its tensors as the model's (see WorkerService.train)."""
    return {k: v.clone() for k, v in state.items()}


def _request(update: str = "weights", seed: int = 7, epochs: int = 1, momentum: float = 0.0) -> TrainRequest:
    optimizer = OptimizerSpec(lr=0.1, momentum=momentum)
    plan = TrainingPlan(epochs=epochs, batch_size=16, optimizer=optimizer, update=update, seed=seed)
    return TrainRequest(round=1, task_id="t1", model=MLP, plan=plan)


def test_training_learns_and_reports_metrics(digit_shards: tuple[list[Path], Path]) -> None:
    service = _service(digit_shards[0][0])
    start = _global()
    result, weights = service.train(_request(epochs=3, momentum=0.9), _copy(start))
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
    _, weights = service.train(_request("weights"), _copy(start))
    _, delta = service.train(_request("delta"), _copy(start))
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


FROZEN = ModelSpec(factory="fedlink.models:sized_mlp",
                   kwargs={"megabytes": 0.05, "in_features": 64, "num_classes": 10, "frozen_backbone": True})


def _frozen_global() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {k: v.clone() for k, v in sized_mlp(**FROZEN.kwargs).state_dict().items()}  # type: ignore[arg-type]


@pytest.mark.parametrize("update", ["weights", "delta"])
def test_a_partial_state_is_completed_from_the_kept_frozen_parameters_and_trains_the_same(
    digit_shards: tuple[list[Path], Path], update: str
) -> None:
    service = _service(digit_shards[0][0])
    start = _frozen_global()
    first = _copy(start)
    request = _request(update, seed=3).model_copy(update={"model": FROZEN})
    _, whole = service.train(_cached(request, None, "k.1"), first)
    frozen = [f"{i}.{kind}" for i in (1, 3, 5) for kind in ("weight", "bias")]
    assert service.memory.global_state is not None
    kept = service.memory.global_state[2]
    assert sorted(kept) == sorted(frozen)  # only what training never changes: the head is sent every round
    assert all(kept[name] is first[name] for name in frozen)  # kept as received, not copied
    part = {name: start[name].clone() for name in start if name not in frozen}
    announced = header_of(part)
    assert service.train_header(_cached(request, "k.1", "k.2"), announced) == announced
    _, again = service.train(_cached(request, "k.1", "k.2"), part)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert service.memory.global_state[1] == "k.2"
    with pytest.raises(CacheMiss, match=r"no 7.weight"):  # a trained tensor is never kept: it must be sent
        service.train_header(_cached(request, "k.2", "k.3"), header_of({}))


def test_weights_are_trained_in_the_received_tensors_and_a_delta_leaves_them_alone(
    digit_shards: tuple[list[Path], Path],
) -> None:
    """For weights (and gradients) the model takes the received tensors as its own: a large model is held once."""
    service = _service(digit_shards[0][0])
    received = _copy(_global())
    _, weights = service.train(_request("weights"), received)
    assert all(weights[name].data_ptr() == received[name].data_ptr() for name in received)
    received = _copy(_global())
    _, delta = service.train(_request("delta"), received)
    assert all(torch.equal(received[name], value) for name, value in _global().items())
    assert all(delta[name].data_ptr() != received[name].data_ptr() for name in received)


def test_a_model_with_state_outside_its_state_dict_is_built_and_loaded_as_before(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffer kept out of the state dict (``persistent=False``) cannot come from the received tensors: the model
    is then built for real and the state copied in, and training goes on."""
    (tmp_path / "fedlink_test_scaled.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Scaled(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n"
        "        self.register_buffer('scale', torch.full((64,), 0.5), persistent=False)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1) * self.scale)\n"
        "def scaled():\n"
        "    return Scaled()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    service = WorkerService(
        load_shard(digit_shards[0][0]), allow=ModelAllowList(["fedlink_test_scaled:scaled"]), worker_id="w0"
    )
    spec = ModelSpec(factory="fedlink_test_scaled:scaled")
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in torch.nn.Linear(64, 10).state_dict().items()}
    start = {f"fc.{k}": v for k, v in start.items()}
    assert service._adopt(spec, _copy(start)) is None  # the buffer would stay on the meta device
    request = _request("weights", epochs=2).model_copy(update={"model": spec})
    result, weights = service.train(request, _copy(start))
    assert result.metrics["accuracy"] > 0.3 and not torch.equal(weights["fc.weight"], start["fc.weight"])


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
