"""A stage served by a named worker-side handler: the way to add a stage type without touching the engine.

The coordinator-side :class:`PluginStage` sends a :class:`~fedlink.protocol.messages.StageRequest` naming the
worker-side ``handler`` (a built-in name, or a ``module:Class`` path the worker's operator must allow with
``fl-worker --allow-plugin``), with a payload per worker. Answers are validated against ``result_model`` before
anyone sees them, and a state the worker announced is fetched when ``result_header`` says what it must look like.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from fedlink.protocol.messages import StageRequest, StageResult
from fedlink.protocol.session import Inbound
from fedlink.protocol.tensors import State, StateHeader

from .engine import Stage, StageCall, WorkerOutcome
from .errors import InvalidUpdate
from .remote import RemoteWorker

__all__ = ["PluginStage", "PluginAnswer"]


@dataclass
class PluginAnswer:
    """A worker's validated answer, and the state it sent, if the stage asked for one."""

    result: BaseModel
    state: State | None = None


class PluginStage(Stage[PluginAnswer]):
    def __init__(
        self,
        name: str,
        *,
        handler: str,
        result_model: type[BaseModel],
        payload: Mapping[str, Any] | Callable[[RemoteWorker], Mapping[str, Any]],
        run_id: str,
        timeout: float,
        min_survivors: int = 1,
        state: Mapping[str, torch.Tensor] | None = None,
        header: StateHeader | None = None,
        result_header: StateHeader | Callable[[RemoteWorker], StateHeader] | None = None,
    ) -> None:
        super().__init__(name, timeout=timeout, min_survivors=min_survivors)
        self.handler = handler
        self.result_model = result_model
        self.payload = payload
        self.run_id = run_id
        self.state = state
        self.header = header
        self.result_header = result_header
        self._tasks: dict[str, str] = {}

    def request(self, server_round: int, worker: RemoteWorker) -> StageCall:
        payload = self.payload(worker) if callable(self.payload) else self.payload
        task_id = f"r{server_round}-{self.name}-{worker.name}"
        self._tasks[worker.name] = task_id
        message = StageRequest(
            round=server_round, task_id=task_id, stage=self.name, handler=self.handler, run=self.run_id,
            payload=dict(payload), worker=worker.route,
        )
        return StageCall(message, self.state, self.header)

    async def accept(self, worker: RemoteWorker, inbound: Inbound, outcome: WorkerOutcome, deadline: float) -> PluginAnswer:
        answer = inbound.message
        if not isinstance(answer, StageResult) or answer.task_id != self._tasks[worker.name]:
            raise InvalidUpdate(f"answered stage {self.name} with {answer.type!r} for another task")
        try:
            result = self.result_model.model_validate(answer.payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidUpdate(
                f"stage {self.name}: bad answer at {'.'.join(map(str, first['loc'])) or '(payload)'}: {first['msg']}"
            ) from None
        state = None
        if self.result_header is not None:
            expected = self.result_header(worker) if callable(self.result_header) else self.result_header
            if inbound.state_header is None:
                raise InvalidUpdate(f"stage {self.name}: the answer carries no state")
            async with asyncio.timeout_at(deadline):
                state = await inbound.fetch(expected=expected)
        return PluginAnswer(result, state)
