"""Training hooks: built-ins by name, plugins only when allowed, bad parameters refused, order respected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedlink.hooks import BUILTIN_HOOKS, GradClipHook, HookContext, HookError, ProximalHook, TrainingHook, build_hooks
from fedlink.plugins import PluginAllowList, PluginError, PluginNotAllowed
from fedlink.training import make_optimizer, train_local

NONE = PluginAllowList()


def test_builtins_are_built_by_name_in_plan_order() -> None:
    hooks = build_hooks([("grad_clip", {"max_norm": 1.0}), ("proximal", {"mu": 0.5})], HookContext(), NONE)
    assert [type(h) for h in hooks] == [GradClipHook, ProximalHook]
    assert set(BUILTIN_HOOKS) >= {"grad_clip", "proximal"}


@pytest.mark.parametrize(
    ("specs", "words"),
    [
        ([("nosuch", {})], "unknown training hook 'nosuch'"),
        ([("proximal", {})], "mu: Field required"),
        ([("proximal", {"mu": -1})], "greater than 0"),
        ([("grad_clip", {"max_norm": 1, "typo": 2})], "typo: Extra inputs are not permitted"),
    ],
)
def test_bad_hooks_are_refused_with_the_reason(specs: list[tuple[str, dict[str, object]]], words: str) -> None:
    with pytest.raises(HookError, match=words):
        build_hooks(specs, HookContext(), NONE)


def test_a_plugin_hook_needs_the_operators_consent_and_is_not_imported_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "lab_hooks.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('yes')\n"
        "from fedlink.hooks import TrainingHook\n"
        "class Scale(TrainingHook):\n"
        "    def transform_update(self, update):\n"
        "        return {k: v * 2 for k, v in update.items()}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginNotAllowed, match="--allow-plugin 'lab_hooks:Scale'"):
        build_hooks([("lab_hooks:Scale", {})], HookContext(), NONE)
    assert not marker.exists(), "a refused plugin's module is never imported"
    (hook,) = build_hooks([("lab_hooks:Scale", {})], HookContext(), PluginAllowList(["lab_hooks:*"]))
    assert torch.equal(hook.transform_update({"w": torch.ones(2)})["w"], torch.full((2,), 2.0))
    with pytest.raises(PluginError, match="not a subclass"):
        build_hooks([("pathlib:Path", {})], HookContext(), PluginAllowList(["pathlib:*"]))


def _train(hooks: list[TrainingHook], seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    optimizer = make_optimizer(list(model.parameters()), name="sgd", lr=0.5)
    train_local(model, x, y, epochs=2, batch_size=8, optimizer=optimizer, seed=seed, hooks=hooks)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_repeats_exactly_and_leaves_the_global_generator_alone() -> None:
    first = _train([])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    torch.manual_seed(123)
    optimizer = make_optimizer(list(model.parameters()), name="sgd", lr=0.1)
    train_local(model, x, y, epochs=1, batch_size=8, optimizer=optimizer, seed=7)
    assert torch.equal(torch.rand(3), expected_next), "dropout drew from a fork of the global generator, not from it"
    assert all(torch.equal(a, b) for a, b in zip(first.values(), _train([]).values())), "same seed, same model"
    assert not all(torch.equal(a, b) for a, b in zip(first.values(), _train([], seed=1).values()))


def test_grad_clip_and_proximal_hooks_change_training() -> None:
    plain = _train([])
    clipped = _train(build_hooks([("grad_clip", {"max_norm": 0.01})], HookContext(), NONE))
    prox = _train(build_hooks([("proximal", {"mu": 1.0})], HookContext(), NONE))
    assert not torch.equal(plain["0.weight"], clipped["0.weight"])
    assert not torch.equal(plain["0.weight"], prox["0.weight"])
