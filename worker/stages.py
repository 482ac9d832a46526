"""Worker-side handlers for the stages of a multi-stage round.

A stage handler answers one :class:`~fedlink.protocol.messages.StageRequest`: its ``Request`` model validates
the payload the coordinator sent, :meth:`StageHandler.handle` does the work (in a thread, off the event loop)
and returns a ``Result`` model that goes back as the payload of a ``StageResult``, optionally with a model state
announced beside it. Handlers keep what later stages of the round need in ``context.round_state`` and what later
rounds need in ``context.run_state``.

fedlink's own handlers register themselves by short name (:func:`register_stage`); any other handler is a
``module:Class`` path that the worker imports only if its operator allowed it (``fl-worker --allow-plugin``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedlink.plugins import PluginAllowList, load_plugin
from fedlink.protocol.tensors import State, StateHeader

from .errors import BadRequest

__all__ = ["StageContext", "StageHandler", "BUILTIN_STAGES", "register_stage", "resolve_stage", "parse_payload"]


@dataclass
class StageContext:
    """What a handler sees: who and where it is, the shard, and the two stores (see :mod:`.memory`)."""

    worker_id: str
    run_id: str
    server_round: int
    stage: str
    x: torch.Tensor
    y: torch.Tensor
    round_state: dict[str, Any] = field(default_factory=dict)
    run_state: dict[str, Any] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    service: Any = None  # the WorkerService, for built-in stages that train (secure aggregation's masked input)


class StageHandler:
    """Base of every stage handler. Subclasses set ``Request``/``Result`` and implement :meth:`handle`."""

    class Request(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    class Result(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    #: Whether this stage accepts a model state announced with the request; its header is then checked against
    #: :meth:`expected_state` before any byte moves.
    takes_state: ClassVar[bool] = False

    def expected_state(self, context: StageContext, request: BaseModel) -> StateHeader | None:
        return None

    def handle(self, context: StageContext, request: BaseModel, state: State | None) -> tuple[BaseModel, State | None]:
        raise NotImplementedError


BUILTIN_STAGES: dict[str, type[StageHandler]] = {}


def register_stage(name: str, cls: type[StageHandler]) -> None:
    BUILTIN_STAGES[name] = cls


def resolve_stage(handler: str, allow: PluginAllowList) -> type[StageHandler]:
    """The handler class for a request's ``handler`` field; refuses before any import when not allowed."""
    if ":" not in handler:
        found = BUILTIN_STAGES.get(handler)
        if found is None:
            known = ", ".join(sorted(BUILTIN_STAGES)) or "none"
            raise BadRequest(f"unknown stage handler {handler[:64]!r}; built-in handlers here: {known}")
        return found
    return load_plugin(handler, allow, StageHandler, what="stage handler")


def parse_payload(model: type[BaseModel], payload: dict[str, Any], *, what: str) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(payload)'}: {e['msg']}" for e in exc.errors()[:5])
        raise BadRequest(f"{what}: {problems}") from exc
