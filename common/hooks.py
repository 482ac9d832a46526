"""The worker's local-training pipeline as an ordered list of hooks named in the training plan.

A hook may change the objective (FedProx's proximal term), act between ``backward`` and the optimizer step
(gradient clipping; SCAFFOLD's correction), or transform the finished update on its way to the codec
(compression). Adding a technique is one hook class here (or in a plugin module the operator allows) and one line
on the coordinator that names it in the plan; the trainer, the service and the wire format do not change.

Hooks run in the order the plan lists them. They see a :class:`HookContext` with the worker's per-round and per-run
stores, so state that must outlive a round (error-feedback residuals, control variates) has a home. Hooks never
touch the global RNG: each gets the trainer's seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import logging

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from fedlink.protocol.tensors import StateHeader, TensorSpec

from . import scaffold
from .errors import FedlinkError
from .plugins import PluginAllowList, load_plugin

__all__ = [
    "HookError",
    "HookContext",
    "TrainingHook",
    "ProximalHook",
    "GradClipHook",
    "ScaffoldHook",
    "BUILTIN_HOOKS",
    "build_hooks",
    "hook_inputs",
    "register_hook",
]

State = dict[str, torch.Tensor]

log = logging.getLogger("fedlink.worker")


class HookError(FedlinkError):
    """A hook named in the plan is unknown, not allowed, or got parameters it cannot take."""

    code = "bad_hook"


@dataclass
class HookContext:
    """What a hook may read and keep: ``round_state`` lives for one round, ``run_state`` for the whole run.

    ``inputs`` holds the tensors that came with the global state because a hook of the plan declared them
    (:meth:`TrainingHook.inputs`), by their names on the wire.
    """

    worker_id: str = "worker"
    server_round: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    round_state: dict[str, Any] = field(default_factory=dict)
    run_state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingHook:
    """Base class: override what the technique needs; every method defaults to doing nothing.

    ``Params`` is the pydantic model of the hook's parameters (from :class:`~fedlink.protocol.messages.HookSpec`);
    unknown keys are refused, so a typo in a plan fails loudly on the worker.
    """

    name: ClassVar[str] = ""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel, context: HookContext) -> None:
        self.params = params
        self.context = context

    @classmethod
    def inputs(cls, params: BaseModel, parameters: StateHeader) -> tuple[TensorSpec, ...]:
        """Tensors this hook takes with the global state, beside the model's own (SCAFFOLD's server control
        variate). ``parameters`` describes the model's parameters. The worker accepts a train request's state only
        if it holds exactly the model's tensors plus these, checked before any byte moves; name them
        ``<hook name>/...`` so they cannot collide with the model's. They reach the hook in ``context.inputs``."""
        return ()

    def setup(self, model: nn.Module) -> None:
        """Called once before the first step, with the model holding the received global weights."""

    def objective(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """The quantity to differentiate for this batch; ``loss`` is the plain cross-entropy."""
        return loss

    def before_step(self, model: nn.Module) -> None:
        """After ``backward`` and before ``optimizer.step()``: gradients are in ``p.grad``."""

    def finish(self, model: nn.Module) -> None:
        """After the last step, before the update is computed from the model's weights."""

    def transform_update(self, update: State) -> State:
        """The update on its way out (after it is computed from the trained weights); return a new dict."""
        return update


class ProximalHook(TrainingHook):
    """FedProx's ``mu/2 * ||w - w_start||^2`` (Li et al., MLSys 2020), ``w_start`` the received weights."""

    name = "proximal"

    class Params(TrainingHook.Params):
        mu: float = Field(gt=0, le=1e6)

    def setup(self, model: nn.Module) -> None:
        self._anchor = [p.detach().clone() for p in model.parameters()]

    def objective(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.params, ProximalHook.Params)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self._anchor))
        return loss + (self.params.mu / 2) * prox


class GradClipHook(TrainingHook):
    """Clip the global L2 norm of the batch gradient to ``max_norm`` (Pascanu et al., ICML 2013)."""

    name = "grad_clip"

    class Params(TrainingHook.Params):
        max_norm: float = Field(gt=0, le=1e12)

    def before_step(self, model: nn.Module) -> None:
        assert isinstance(self.params, GradClipHook.Params)
        nn.utils.clip_grad_norm_(model.parameters(), self.params.max_norm)


class ScaffoldHook(TrainingHook):
    """SCAFFOLD's drift correction and control variate (Karimireddy et al., ICML 2020, option II).

    Takes the server's ``c`` with the global state, corrects every gradient to ``g + c - c_i`` before the step,
    and after the last step computes ``c_i+`` (:func:`fedlink.scaffold.option_ii`) and appends ``Δc_i`` to the
    update. ``c_i`` stays in the run store between rounds; the last few are kept by the round that produced them,
    so a round that is run again (a coordinator resumed from its checkpoint, a retried round) starts from the
    ``c_i`` that was current before it, and the run repeats bit for bit. A worker without one (first round, or
    restarted) starts from zero and reports ``scaffold_fresh = 1``. ``lr`` and ``momentum`` are the round's.
    """

    name = "scaffold"
    keep = 3  # c_i of the last rounds: a resumed coordinator re-runs at most the two rounds after its checkpoint

    class Params(TrainingHook.Params):
        lr: float = Field(gt=0)
        momentum: float = Field(0.0, ge=0, lt=1)

    @classmethod
    def inputs(cls, params: BaseModel, parameters: StateHeader) -> tuple[TensorSpec, ...]:
        return scaffold.control_specs(parameters)

    def setup(self, model: nn.Module) -> None:
        self._params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self._start = {n: p.detach().clone() for n, p in self._params.items()}
        self._c = {n: self.context.inputs[scaffold.control_name(n)].to(p.device, p.dtype) for n, p in self._params.items()}
        history: list[tuple[int, dict[str, torch.Tensor]]] = self.context.run_state.get("scaffold", [])
        earlier = [c_i for produced, c_i in history if produced < self.context.server_round]
        if earlier:
            self._c_i = earlier[-1]
        else:
            self._c_i = {n: torch.zeros_like(p) for n, p in self._params.items()}
            self.context.metrics["scaffold_fresh"] = 1.0
            log.info("round %d: no SCAFFOLD control variate for this run yet; starting from zero", self.context.server_round)
        self._correction = {n: self._c[n] - self._c_i[n] for n in self._params}
        self._steps = 0

    def before_step(self, model: nn.Module) -> None:
        for name, p in self._params.items():
            if not p.requires_grad:  # frozen: the correction must not make the optimizer move it
                continue
            if p.grad is None:
                p.grad = self._correction[name].clone()
            else:
                p.grad.add_(self._correction[name])
        self._steps += 1

    def finish(self, model: nn.Module) -> None:
        assert isinstance(self.params, ScaffoldHook.Params)
        end = {n: p.detach() for n, p in self._params.items()}
        lr = scaffold.effective_lr(self.params.lr, self.params.momentum)
        c_i_plus = scaffold.option_ii(self._c_i, self._c, self._start, end, steps=max(self._steps, 1), lr=lr)
        self._delta = {n: (c_i_plus[n] - self._c_i[n]).to("cpu") for n in self._params}
        server_round = self.context.server_round
        history = [(r, c) for r, c in self.context.run_state.get("scaffold", []) if r < server_round]
        self.context.run_state["scaffold"] = [*history, (server_round, c_i_plus)][-self.keep :]

    def transform_update(self, update: State) -> State:
        return {**update, **{scaffold.delta_name(n): d for n, d in self._delta.items()}}


BUILTIN_HOOKS: dict[str, type[TrainingHook]] = {cls.name: cls for cls in (ProximalHook, GradClipHook, ScaffoldHook)}


def register_hook(cls: type[TrainingHook]) -> type[TrainingHook]:
    """Add a built-in hook (used by fedlink's own modules; third-party hooks load by path instead)."""
    BUILTIN_HOOKS[cls.name] = cls
    return cls


def build_hooks(
    specs: Sequence[tuple[str, Mapping[str, Any]]], context: HookContext, allow: PluginAllowList
) -> list[TrainingHook]:
    """Instantiate the plan's hooks in order; built-in names directly, ``module:Class`` paths if allowed."""
    return [cls(parsed, context) for cls, parsed in (_resolve(name, params, allow) for name, params in specs)]


def hook_inputs(
    specs: Sequence[tuple[str, Mapping[str, Any]]], parameters: StateHeader, allow: PluginAllowList
) -> tuple[TensorSpec, ...]:
    """The tensors the plan's hooks take with the global state (see :meth:`TrainingHook.inputs`), in plan order.

    Resolves and checks every hook first, so a plan naming an unknown or refused hook fails before a byte moves.
    """
    return tuple(spec for name, params in specs for cls, parsed in [_resolve(name, params, allow)]
                 for spec in cls.inputs(parsed, parameters))


def _resolve(name: str, params: Mapping[str, Any], allow: PluginAllowList) -> tuple[type[TrainingHook], BaseModel]:
    if ":" in name:
        cls = load_plugin(name, allow, TrainingHook, what="training hook")
    elif name in BUILTIN_HOOKS:
        cls = BUILTIN_HOOKS[name]
    else:
        known = ", ".join(sorted(BUILTIN_HOOKS))
        raise HookError(f"unknown training hook {name[:64]!r}; this worker knows {known} (or a module:Class path)")
    try:
        parsed = cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise HookError(f"training hook {name!r}: bad parameters: {problems}") from exc
    return cls, parsed
