"""fedlink: federated learning for PyTorch over WebSockets.

The Python API is imported on first use, so ``import fedlink`` stays light (no torch, no network code):
``fedlink.train``, ``fedlink.train_async``, ``fedlink.simulate``, ``fedlink.Coordinator``, ``fedlink.LocalWorkers``,
``fedlink.CallbackProgress``, ``fedlink.ProgressEvent``, ``fedlink.RoundRecord``, ``fedlink.JobConfig``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlink.api import LocalWorkers, RoundRecord, simulate, simulate_async, train, train_async
    from fedlink.server.config import JobConfig
    from fedlink.server.coordinator import Coordinator
    from fedlink.server.observers import CallbackProgress, ProgressEvent

__all__ = [
    "train",
    "train_async",
    "simulate",
    "simulate_async",
    "Coordinator",
    "LocalWorkers",
    "CallbackProgress",
    "ProgressEvent",
    "RoundRecord",
    "JobConfig",
]

_LAZY = {
    "train": "fedlink.api",
    "train_async": "fedlink.api",
    "simulate": "fedlink.api",
    "simulate_async": "fedlink.api",
    "LocalWorkers": "fedlink.api",
    "RoundRecord": "fedlink.api",
    "Coordinator": "fedlink.server.coordinator",
    "CallbackProgress": "fedlink.server.observers",
    "ProgressEvent": "fedlink.server.observers",
    "JobConfig": "fedlink.server.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlink' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
