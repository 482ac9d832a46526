"""What a worker does with a request, without the network: build the model, load weights, train or evaluate.

:class:`WorkerService` is the whole of a worker's logic; the daemon (:mod:`.daemon`) is a thin network shell
around it, and a simulation can hold many services in one process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from functools import lru_cache

import torch
from torch import nn

from fedlink.errors import ModelError
from fedlink.factory import ModelAllowList, build_model
from fedlink.protocol.messages import (
    DatasetInfo,
    EvaluateRequest,
    EvaluateResult,
    ModelSpec,
    TrainRequest,
    TrainResult,
    UpdateKind,
)
from fedlink.protocol.tensors import State, StateHeader, header_of
from fedlink.shards import Shard
from fedlink.training import average_gradients, evaluate, make_optimizer, train_local

from .errors import BadRequest

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
        self, shard: Shard, *, allow: ModelAllowList, device: str = "cpu", worker_id: str = "worker"
    ) -> None:
        self.shard = shard
        self.allow = allow
        self.device = torch.device(device)
        self.worker_id = worker_id
        self._x, self._y = shard.to_tensors()
        if self.device.type != "cpu":
            self._x, self._y = self._x.to(self.device), self._y.to(self.device)

    def dataset_info(self) -> DatasetInfo:
        return DatasetInfo(
            num_samples=self.shard.num_samples, sample_shape=self.shard.sample_shape, x_dtype=self.shard.x_dtype
        )

    def check_model(self, spec: ModelSpec) -> StateHeader:
        """Refuse disallowed factories before anything is imported; returns the state the model expects."""
        self.allow.check(spec.factory)
        return expected_header(spec, self.allow)

    def _load(self, spec: ModelSpec, state: State) -> nn.Module:
        model = build_model(spec.factory, spec.kwargs, self.allow)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as exc:
            raise BadRequest(f"weights do not fit model {spec.factory}: {exc}") from exc
        return model.to(self.device)

    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        plan = request.plan
        started = time.perf_counter()
        model = self._load(request.model, state)
        if plan.update == "gradients":
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
                grad_clip=plan.grad_clip,
                proximal_mu=plan.proximal_mu,
                max_steps=plan.max_steps,
                device=self.device,
                stop=stop,
            )
            trained = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
            update = make_update(plan.update, state, trained)
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
            metrics=metrics.as_dict(),
            train_seconds=seconds,
        )
        return result, update

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
