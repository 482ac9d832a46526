"""SCAFFOLD on the worker: option II by hand, the ``scaffold`` hook's correction and its control variates by round,
and the train header that lets the server's control variate travel with the global state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedlink import scaffold
from fedlink.factory import ModelAllowList
from fedlink.hooks import HookContext, ScaffoldHook, build_hooks, hook_inputs
from fedlink.plugins import PluginAllowList
from fedlink.protocol.messages import HookSpec, ModelSpec, TrainingPlan, TrainRequest
from fedlink.protocol.tensors import header_of
from fedlink.shards import load_shard, save_shard
from fedlink.training import make_optimizer, train_local
from fedlink.worker.errors import BadRequest
from fedlink.worker.service import WorkerService

LINEAR = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 4, "num_classes": 2, "depth": 0})


def test_option_ii_by_hand() -> None:
    c_i = {"w": torch.tensor([1.0, 0.0])}
    c = {"w": torch.tensor([0.5, 0.5])}
    start, end = {"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 3.0])}
    # c_i - c + (start - end) / (K lr) with K lr = 4 * 0.5: (0.5, -0.5) + (0.5, -0.5)
    assert torch.equal(scaffold.option_ii(c_i, c, start, end, steps=4, lr=0.5)["w"], torch.tensor([1.0, -1.0]))
    assert scaffold.effective_lr(0.1, 0.0) == 0.1 and scaffold.effective_lr(0.1, 0.5) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least one local step"):
        scaffold.option_ii(c_i, c, start, end, steps=0, lr=0.5)


def test_control_variates_cover_floating_point_parameters_under_their_own_names() -> None:
    header = header_of({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2), "count": torch.zeros(1, dtype=torch.int64)})
    assert [t.describe() for t in scaffold.control_specs(header)] == ["scaffold/c/fc.weight float32[2, 3]", "scaffold/c/fc.bias float32[2]"]
    assert [t.name for t in scaffold.delta_specs(header)] == ["scaffold/delta_c/fc.weight", "scaffold/delta_c/fc.bias"]


def _train(context: HookContext, model: nn.Module, *, steps: int, lr: float = 0.1) -> tuple[ScaffoldHook, dict[str, torch.Tensor]]:
    (hook,) = build_hooks([("scaffold", {"lr": lr})], context, PluginAllowList())
    assert isinstance(hook, ScaffoldHook)
    x = torch.randn(8 * steps, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    train_local(model, x, y, epochs=1, batch_size=8, optimizer=make_optimizer(list(model.parameters()), name="sgd", lr=lr),
                seed=0, hooks=[hook])
    return hook, hook.transform_update({})


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))


def _controls(model: nn.Module, value: float) -> dict[str, torch.Tensor]:
    return {scaffold.control_name(n): torch.full_like(p, value) for n, p in model.named_parameters()}


def test_the_correction_moves_every_step_by_c_minus_c_i_and_c_i_follows_option_ii() -> None:
    plain, corrected = _linear(), _linear()
    # Plain local SGD for comparison: the same batches, no hook.
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    train_local(plain, x, y, epochs=1, batch_size=8, optimizer=make_optimizer(list(plain.parameters()), name="sgd", lr=0.1), seed=0)
    start = {n: p.detach().clone() for n, p in corrected.named_parameters()}
    context = HookContext(server_round=1, inputs=_controls(corrected, 0.25))
    hook, update = _train(context, corrected, steps=2)
    assert context.metrics == {"scaffold_fresh": 1.0}  # no c_i yet: zero
    for name, p in corrected.named_parameters():
        # Option II with c_i = 0, K = 2 steps, lr 0.1: Δc_i = c_i+ = -c + (start - end) / (K lr)
        expected = -0.25 + (start[name] - p.detach()) / (2 * 0.1)
        assert torch.allclose(update[scaffold.delta_name(name)], expected, atol=1e-6)
    # With c - c_i = 0.25 on every coordinate, two steps of lr 0.1 move each weight 0.05 further down than plain SGD
    # would, up to the change in the gradient that the shift itself causes.
    shift = {n: (p.detach() - q.detach()) for (n, p), q in zip(corrected.named_parameters(), plain.parameters())}
    assert all(torch.allclose(s, torch.full_like(s, -0.05), atol=0.02) for s in shift.values())
    assert [r for r, _ in context.run_state["scaffold"]] == [1]


def test_control_variates_are_kept_by_round_so_a_round_run_again_starts_from_the_same_one() -> None:
    run_state: dict[str, object] = {}
    deltas = {}
    for server_round in (1, 2, 3, 4):
        context = HookContext(server_round=server_round, run_state=run_state, inputs=_controls(_linear(), 0.1 * server_round))
        _, deltas[server_round] = _train(context, _linear(), steps=1)
    assert [r for r, _ in run_state["scaffold"]] == [2, 3, 4]  # type: ignore[union-attr]  # the last ScaffoldHook.keep
    # A coordinator resumed from round 2's checkpoint sends round 3 again: same c_i (round 2's), same result.
    context = HookContext(server_round=3, run_state=run_state, inputs=_controls(_linear(), 0.3))
    _, again = _train(context, _linear(), steps=1)
    assert all(torch.equal(again[k], deltas[3][k]) for k in again) and "scaffold_fresh" not in context.metrics
    assert [r for r, _ in run_state["scaffold"]] == [2, 3]  # type: ignore[union-attr]  # round 4's was abandoned
    # Rewound past what is kept: starts from zero and says so.
    context = HookContext(server_round=2, run_state=run_state, inputs=_controls(_linear(), 0.2))
    _train(context, _linear(), steps=1)
    assert context.metrics == {"scaffold_fresh": 1.0}


def _service(tmp_path: Path) -> WorkerService:
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    return WorkerService(load_shard(save_shard(tmp_path / "shard.npy", x, (x[:, 0] > 0).astype(np.int64))), allow=ModelAllowList())


def _request(*hooks: HookSpec) -> TrainRequest:
    return TrainRequest(round=1, task_id="t", model=LINEAR, plan=TrainingPlan(batch_size=16, hooks=hooks), run="run")


def test_the_train_header_holds_what_the_plans_hooks_take_and_nothing_else(tmp_path: Path) -> None:
    service = _service(tmp_path)
    model = service.check_model(LINEAR)
    assert service.train_header(_request()) == model
    assert service.train_header(_request(HookSpec(name="grad_clip", params={"max_norm": 1.0}))) == model
    with_scaffold = service.train_header(_request(HookSpec(name="scaffold", params={"lr": 0.1})))
    assert [t.name for t in with_scaffold.tensors] == [
        *(t.name for t in model.tensors), "scaffold/c/1.weight", "scaffold/c/1.bias"
    ]
    with pytest.raises(BadRequest, match="unknown training hook 'nope'"):
        service.train_header(_request(HookSpec(name="nope")))
    assert hook_inputs([("proximal", {"mu": 0.1})], model, PluginAllowList()) == ()


def test_the_service_hands_hook_tensors_to_the_hooks_and_trains_on_the_model_alone(tmp_path: Path) -> None:
    service = _service(tmp_path)
    request = _request(HookSpec(name="scaffold", params={"lr": 0.1}))
    state = {k: v.clone() for k, v in _linear().state_dict().items()}
    controls = {scaffold.control_name(k): torch.zeros_like(v) for k, v in state.items()}
    result, update = service.train(request, {**state, **controls})
    assert set(update) == {*state, *(scaffold.delta_name(k) for k in state)}
    assert result.metrics["scaffold_fresh"] == 1.0
    again, second = service.train(request.model_copy(update={"round": 2}), {**state, **controls})
    assert "scaffold_fresh" not in again.metrics  # round 1's c_i is in the run store
    assert not torch.equal(second[scaffold.delta_name("1.weight")], update[scaffold.delta_name("1.weight")])
