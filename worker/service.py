"""What a worker does with a request, without the network: build the model, load weights, train or evaluate.

:class:`WorkerService` is the whole of a worker's logic; the daemon (:mod:`.daemon`) is a thin network shell
around it, and a simulation can hold many services in one process.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from pydantic import BaseModel
from torch import nn

from fedlink.errors import ModelError
from fedlink.compression import download_header
from fedlink.factory import ModelAllowList, build_model
from fedlink.hooks import HookContext, HookError, TrainingHook, build_hooks, hook_inputs
from fedlink.plugins import PluginAllowList, PluginError, PluginNotAllowed
from fedlink.protocol.messages import (
    DatasetInfo,
    EvaluateRequest,
    EvaluateResult,
    ModelSpec,
    StageRequest,
    StageResult,
    TrainRequest,
    TrainResult,
    UpdateKind,
)
from fedlink.protocol.tensors import State, StateHeader, header_of
from fedlink.shards import Shard
from fedlink.training import average_gradients, evaluate, make_optimizer, train_local

from fedlink.protocol.limits import Limits

from .budget import budget_active, build_budget, check_kwargs
from .errors import BadRequest, CacheMiss
from . import secure_stages  # noqa: F401  (registers secure aggregation's built-in stage handlers)
from .memory import WorkerMemory
from .policy import PolicyGate, WorkerPolicy
from .stages import StageContext, StageHandler, parse_payload, resolve_stage

__all__ = ["WorkerService", "expected_header", "make_update"]

log = logging.getLogger("fedlink.worker")


def _build(spec: ModelSpec, allow: ModelAllowList, device: str | torch.device = "cpu") -> nn.Module:
    with torch.device(device):
        return build_model(spec.factory, spec.kwargs, allow)


@lru_cache(maxsize=32)
def _expected(factory: str, kwargs_json: str, update: str, allow: ModelAllowList) -> StateHeader:
    spec = ModelSpec(factory=factory, kwargs=json.loads(kwargs_json))
    try:
        model = _build(spec, allow, "meta")
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - some factories cannot build on the meta device; build for real then
        model = _build(spec, allow, "cpu")
    if update == "gradients":
        return header_of(dict(model.named_parameters()))
    return header_of(model.state_dict())


def expected_header(spec: ModelSpec, allow: ModelAllowList, update: UpdateKind = "weights") -> StateHeader:
    """The tensors a state for ``spec`` must have, found without allocating the model (meta device)."""
    return _expected(spec.factory, json.dumps(spec.kwargs, sort_keys=True), update, allow)


def make_update(kind: UpdateKind, received: State, trained: State) -> State:
    """``delta`` is trained minus received for floating-point tensors; integer and bool buffers travel as values."""
    if kind == "weights":
        return trained
    return {
        name: (value - received[name]) if value.is_floating_point() else value for name, value in trained.items()
    }


class WorkerService:
    """A worker's logic over its shard. Not thread-safe: the daemon runs one job at a time."""

    def __init__(
        self,
        shard: Shard,
        *,
        allow: ModelAllowList,
        device: str = "cpu",
        worker_id: str = "worker",
        plugins: PluginAllowList | None = None,
        slowdown: float = 1.0,
        policy: WorkerPolicy | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        self.shard = shard
        # The operator's policy (fl-worker --policy and flags), checked before any of the training pipeline runs.
        self.gate = PolicyGate(policy or WorkerPolicy(), num_samples=shard.num_samples, allow=allow)
        self.max_state_bytes = max_state_bytes if max_state_bytes is not None else Limits().max_state_bytes
        self.max_tensors = Limits().max_tensors
        self.allow = allow
        self.plugins = plugins or PluginAllowList()
        self.device = torch.device(device)
        self.worker_id = worker_id
        self.memory = WorkerMemory()
        # Testing heterogeneity: each job takes ``slowdown`` times as long as it really did (``--slowdown``).
        self.slowdown = slowdown
        self._x, self._y = shard.to_tensors()
        if self.device.type != "cpu":
            self._x, self._y = self._x.to(self.device), self._y.to(self.device)

    def dataset_info(self) -> DatasetInfo:
        return DatasetInfo(
            num_samples=self.shard.num_samples, sample_shape=self.shard.sample_shape, x_dtype=self.shard.x_dtype
        )

    @contextmanager
    def build_limits(self, stop: threading.Event | None = None) -> Iterator[None]:
        """Model building in this block stops past ``max_state_bytes`` (``--max-state-mb``) or when ``stop`` is set."""
        if budget_active() and stop is None:
            yield
            return
        with build_budget(max_state_bytes=self.max_state_bytes, max_tensors=self.max_tensors, stop=stop):
            yield

    def check_model(self, spec: ModelSpec) -> StateHeader:
        """Refuse disallowed factories before anything is imported, oversized kwargs before anything is built,
        and a model over this worker's state limit while it is being built on the meta device; returns the
        state the model expects. Call it off the event loop: a factory may take a while even on meta."""
        self.allow.check(spec.factory)
        check_kwargs(spec.kwargs)
        with self.build_limits():
            return expected_header(spec, self.allow)

    def train_header(self, request: TrainRequest, announced: StateHeader | None = None) -> StateHeader:
        """The state a train request must announce: the model's tensors, plus those its plan's hooks take with it
        (:meth:`fedlink.hooks.TrainingHook.inputs`). Refuses unknown or disallowed hooks before a byte moves.

        Under ``request.cache`` with a base, the announced tensors are a part of that, and the rest must be in the
        kept state, with the same dtype and shape; a worker that does not keep that state says so (``cache_miss``),
        and the coordinator sends everything next time."""
        full = self._train_header(request)
        if request.cache is None or request.cache.base is None:
            return full
        kept = self.memory.cached_state(request.run, request.cache.base)
        if kept is None:
            raise CacheMiss(
                f"worker {self.worker_id!r} does not keep global state {request.cache.base!r} (restarted, or it "
                "kept another since); the next request must send the whole state"
            )
        sent = {t.name for t in announced.tensors} if announced is not None else set()
        for spec in full.tensors:
            if spec.name in sent:
                continue
            value = kept.get(spec.name)
            if value is None or tuple(value.shape) != spec.shape or str(value.dtype).removeprefix("torch.") != spec.dtype:
                raise CacheMiss(f"kept global state has no {spec.describe()}; the next request must send it")
        return StateHeader(tensors=tuple(t for t in full.tensors if t.name in sent))

    def _train_header(self, request: TrainRequest) -> StateHeader:
        model = download_header(self.check_model(request.model), request.plan.download or "float32")
        if not request.plan.hooks:
            return model
        try:
            extra = hook_inputs(
                [(h.name, h.params) for h in request.plan.hooks],
                expected_header(request.model, self.allow, "gradients"),
                self.plugins,
            )
        except (HookError, PluginError) as exc:
            raise BadRequest(str(exc)) from exc
        if not extra:
            return model
        extra = download_header(StateHeader(tensors=extra), request.plan.download or "float32").tensors
        clash = sorted({t.name for t in extra} & {t.name for t in model.tensors})
        if clash:
            raise BadRequest(f"training hooks take tensors named like the model's own: {', '.join(clash[:5])}")
        return StateHeader(tensors=(*model.tensors, *extra))

    def _load(self, spec: ModelSpec, state: State, *, adopt: bool = False) -> nn.Module:
        """The model with ``state`` loaded.

        With ``adopt`` the model takes the received tensors as its own instead of copies (built on the meta device,
        then ``load_state_dict(assign=True)``): a large model is then held once, not twice. Training changes them in
        place, so only a caller that needs no received value afterwards asks for it (weights and gradients updates;
        a delta needs the received weights).
        """
        if adopt:
            model = self._adopt(spec, state)
            if model is not None:
                return model.to(self.device)
        with self.build_limits():
            model = build_model(spec.factory, spec.kwargs, self.allow)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as exc:
            raise BadRequest(f"weights do not fit model {spec.factory}: {exc}") from exc
        return model.to(self.device)

    def _adopt(self, spec: ModelSpec, state: State) -> nn.Module | None:
        """The model built on the meta device around ``state``'s tensors; None when the state cannot be all of it
        (a buffer outside the state dict stays on the meta device), and the copying path must build it."""
        with self.build_limits(), torch.device("meta"):
            model = build_model(spec.factory, spec.kwargs, self.allow)
        targets = model.state_dict()
        if targets.keys() != state.keys():
            return None  # the copying path names what does not fit
        # A cast-down download (training.download) is cast back to the model's dtypes: those tensors are copies.
        owned = {name: value if value.dtype == targets[name].dtype else value.to(targets[name].dtype)
                 for name, value in state.items()}
        try:
            model.load_state_dict(owned, strict=True, assign=True)
        except (RuntimeError, KeyError) as exc:
            raise BadRequest(f"weights do not fit model {spec.factory}: {exc}") from exc
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return None
        return model

    def _hooks(self, request: TrainRequest, context: HookContext) -> list[TrainingHook]:
        try:
            return build_hooks([(h.name, h.params) for h in request.plan.hooks], context, self.plugins)
        except PluginNotAllowed:
            raise  # carries its own error code, for the coordinator's per-worker report
        except (HookError, PluginError) as exc:
            raise BadRequest(str(exc)) from exc

    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        """Train on ``state`` as ``request`` says; returns the result and the update to send.

        Takes ownership of ``state``: for ``weights`` and ``gradients`` updates the model is built around its
        tensors (see :meth:`_load`), so training changes them. A caller that needs the received values afterwards
        passes a copy.
        """
        plan = request.plan
        # Also here, not only at the daemon: stage handlers (secure aggregation) reach training through this method.
        self.gate.check_plan(plan, request_level=False)
        started = time.perf_counter()
        if request.cache is not None:
            state = self._with_kept(request, state)
        store = self.memory.run(request.run)
        model_names = {t.name for t in self.check_model(request.model).tensors}
        inputs = {name: value for name, value in state.items() if name not in model_names}
        if inputs:  # what the plan's hooks declared (train_header), beside the model's tensors
            state = {name: value for name, value in state.items() if name in model_names}
        context = HookContext(
            worker_id=self.worker_id,
            server_round=request.round,
            generator=torch.Generator().manual_seed(plan.seed),
            round_state=self.memory.round(request.run, request.round),
            run_state=store.data,
            inputs=inputs,
        )
        hooks = self._hooks(request, context)
        local_dp = plan.privacy is not None and plan.privacy.mode == "local"
        model = self._load(request.model, state, adopt=plan.update != "delta" and not local_dp)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        if request.cache is not None:
            # Kept for the next request: the frozen parameters, which training never changes (the others, adopted
            # by the model, change in place; the coordinator sends them every round).
            self.memory.global_state = (request.run, request.cache.key, {name: state[name] for name in frozen})
        if local_dp:  # DP-SGD replaces the loop (.local_dp)
            from .local_dp import train_private  # imports Opacus: only workers asked for local DP pay for it

            metrics, private = train_private(
                model, self._x, self._y, plan, run_id=request.run, server_round=request.round, run_state=store.data,
                max_epsilon=self.gate.policy.max_epsilon, stop=stop,
            )
            context.metrics.update(private)
            trained = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
            update = make_update(plan.update, state, trained)
        elif plan.update == "gradients":
            update, metrics = average_gradients(
                model, self._x, self._y, batch_size=plan.batch_size, device=self.device, stop=stop
            )
        else:
            opt = plan.optimizer
            optimizer = make_optimizer(
                list(model.parameters()),
                name=opt.name,
                lr=opt.lr,
                momentum=opt.momentum,
                weight_decay=opt.weight_decay,
                nesterov=opt.nesterov,
            )
            metrics = train_local(
                model,
                self._x,
                self._y,
                epochs=plan.epochs,
                batch_size=plan.batch_size,
                optimizer=optimizer,
                seed=plan.seed,
                hooks=hooks,
                max_steps=plan.max_steps,
                device=self.device,
                stop=stop,
            )
            trained = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
            update = make_update(plan.update, state, trained)
        if plan.upload == "trainable":  # the coordinator knows them: unchanged weights, zero deltas
            update = {name: value for name, value in update.items() if name not in frozen}
        for hook in hooks:
            update = hook.transform_update(update)
        store.fresh = False
        self._slow_down(time.perf_counter() - started, stop)
        seconds = time.perf_counter() - started
        log.info(
            "round %d task %s: trained %s on %d samples in %.2fs (loss %.4f, accuracy %.4f)",
            request.round, request.task_id, plan.update, metrics.num_samples, seconds, metrics.loss, metrics.accuracy,
        )
        result = TrainResult(
            round=request.round,
            task_id=request.task_id,
            update=plan.update,
            num_samples=metrics.num_samples if plan.update != "gradients" else self.shard.num_samples,
            metrics={**metrics.as_dict(), **context.metrics},
            train_seconds=seconds,
        )
        return result, update

    def _with_kept(self, request: TrainRequest, state: State) -> State:
        """The whole global state: what was sent, and the rest from the tensors kept from the last request."""
        assert request.cache is not None
        if request.cache.base is None:
            return state
        kept = self.memory.cached_state(request.run, request.cache.base)
        order = self._train_header(request).tensors
        if kept is None or any(t.name not in state and t.name not in kept for t in order):
            raise CacheMiss(
                f"worker {self.worker_id!r} no longer keeps global state {request.cache.base!r}; "
                "the next request must send the whole state"
            )
        return {t.name: state[t.name] if t.name in state else kept[t.name] for t in order}

    def _slow_down(self, seconds: float, stop: threading.Event | None) -> None:
        if self.slowdown > 1:
            (stop or threading.Event()).wait(seconds * (self.slowdown - 1))

    def stage_handler(self, request: StageRequest) -> tuple[StageHandler, StageContext, BaseModel]:
        """Resolve, instantiate and parse: everything that can refuse a stage before its state moves."""
        cls = resolve_stage(request.handler, self.plugins)  # PluginNotAllowed carries its own error code
        parsed = parse_payload(cls.Request, request.payload, what=f"stage {request.stage!r} ({request.handler})")
        context = StageContext(
            worker_id=self.worker_id,
            run_id=request.run,
            server_round=request.round,
            stage=request.stage,
            x=self._x,
            y=self._y,
            round_state=self.memory.round(request.run, request.round),
            run_state=self.memory.run(request.run).data,
            service=self,
        )
        return cls(), context, parsed

    def run_stage(
        self, handler: StageHandler, context: StageContext, request: StageRequest, parsed: BaseModel,
        state: State | None, stop: threading.Event | None = None,
    ) -> tuple[StageResult, State | None]:
        if stop is not None:
            context.stop = stop
        answer, out_state = handler.handle(context, parsed, state)
        result = StageResult(round=request.round, task_id=request.task_id, payload=answer.model_dump(mode="json"))
        return result, out_state

    def evaluate(self, request: EvaluateRequest, state: State, stop: threading.Event | None = None) -> EvaluateResult:
        model = self._load(request.model, state)
        metrics = evaluate(model, self._x, self._y, batch_size=request.batch_size, device=self.device, stop=stop)
        return EvaluateResult(
            round=request.round,
            task_id=request.task_id,
            num_samples=metrics.num_samples,
            loss=metrics.loss,
            accuracy=metrics.accuracy,
        )
