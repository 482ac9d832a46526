"""Building a coordinator-named model within the worker's limits, before real memory or much time is spent.

A request names a factory and keyword arguments; a hundred bytes (``depth: 100000``) can ask for a model that takes
minutes and gigabytes to build, even on the meta device. So, before anything is built:

- the keyword-argument document is bounded (:data:`MAX_KWARGS_BYTES` of JSON);
- the model is first built on the meta device under a :func:`build_budget`: torch's global registration hooks
  see every parameter, buffer and submodule as the factory creates it, and the build is stopped with
  :class:`ModelTooLarge` as soon as the state would exceed the worker's ``--max-state-mb`` or its tensor count
  the protocol's ``max_tensors``, or its submodules :data:`MAX_MODULES`, or when the job's stop event is set (its session closed). Construction is
  cut short after a bounded amount of work instead of running to completion and being measured afterwards;
- only a model that passed is built for real.

The hooks are process-wide but act only in a thread that entered a budget, so other threads building models
(the coordinator's, in tests that run both in one process) are untouched.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from fedlink.errors import ModelError
from fedlink.training import TrainingCancelled

__all__ = ["MAX_KWARGS_BYTES", "MAX_MODULES", "ModelTooLarge", "budget_active", "build_budget", "check_kwargs"]

MAX_KWARGS_BYTES = 16 * 1024
MAX_MODULES = 20_000  # far above ResNet-152 (~500) or an 80-layer transformer (~1,000)


class ModelTooLarge(ModelError):
    """The model a request names is larger than this worker builds; nothing of it was kept."""

    code = "model_too_large"


class _Budget:
    def __init__(self, max_state_bytes: int, max_tensors: int, stop: threading.Event | None) -> None:
        self.max_state_bytes = max_state_bytes
        self.max_tensors = max_tensors
        self.stop = stop
        self.state_bytes = 0
        self.tensors = 0
        self.modules = 0

    def charge(self, tensor: torch.Tensor | None) -> None:
        self._check_stop()
        if tensor is None:
            return
        self.tensors += 1
        self.state_bytes += tensor.numel() * tensor.element_size()
        if self.state_bytes > self.max_state_bytes:
            raise ModelTooLarge(
                f"the model's state would exceed this worker's limit of {self.max_state_bytes / 2**20:g} MiB "
                "(fl-worker --max-state-mb)"
            )
        if self.tensors > self.max_tensors:
            raise ModelTooLarge(f"the model would have more than {self.max_tensors} tensors (the protocol's max_tensors)")

    def module(self) -> None:
        self._check_stop()
        self.modules += 1
        if self.modules > MAX_MODULES:  # modules without tensors (ReLU) cost time too
            raise ModelTooLarge(f"the model would have more than {MAX_MODULES} submodules")

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise TrainingCancelled("model building stopped: the request's session closed")


_local = threading.local()


def _current() -> _Budget | None:
    budget: _Budget | None = getattr(_local, "budget", None)
    return budget


def _on_tensor(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    budget = _current()
    if budget is not None:
        budget.charge(tensor)


def _on_module(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    budget = _current()
    if budget is not None:
        budget.module()


torch_module.register_module_parameter_registration_hook(_on_tensor)
torch_module.register_module_buffer_registration_hook(_on_tensor)
torch_module.register_module_module_registration_hook(_on_module)


@contextmanager
def build_budget(*, max_state_bytes: int, max_tensors: int, stop: threading.Event | None = None) -> Iterator[None]:
    """Within this block (in this thread), building a module raises :class:`ModelTooLarge` past the limits."""
    previous = _current()
    _local.budget = _Budget(max_state_bytes, max_tensors, stop)
    try:
        yield
    finally:
        _local.budget = previous


def budget_active() -> bool:
    """Whether this thread is inside a :func:`build_budget` block."""
    return _current() is not None


def check_kwargs(kwargs: Mapping[str, Any]) -> str:
    """The kwargs as canonical JSON, refused when larger than :data:`MAX_KWARGS_BYTES`."""
    text = json.dumps(kwargs, sort_keys=True)
    if len(text) > MAX_KWARGS_BYTES:
        raise ModelTooLarge(f"model kwargs of {len(text)} bytes; a worker takes at most {MAX_KWARGS_BYTES}")
    return text
