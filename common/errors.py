"""The root of every exception fedlink raises on purpose.

Each package has its own small tree under :class:`FedlinkError`::

    FedlinkError
    ├── DataError                 (fedlink.errors)   a shard or data file is unusable
    ├── ModelError                (fedlink.errors)   a model factory is malformed, not allowed or fails
    │   └── ModelNotAllowed
    ├── ProtocolError             (fedlink.protocol.errors)
    ├── WorkerError               (fedlink.worker.errors)
    └── CoordinatorError          (fedlink.server.errors)

Catch :class:`FedlinkError` at a process edge (a CLI command, a daemon's request loop) to turn any expected
failure into a clean message; anything else escaping is a bug.
"""

from __future__ import annotations

__all__ = ["FedlinkError", "DataError", "ModelError", "ModelNotAllowed"]


class FedlinkError(Exception):
    """Base class of all of fedlink's own errors; ``code`` is what a daemon sends back in an ``error`` message."""

    code = "failed"


class DataError(FedlinkError):
    """A data file (shard, evaluation set, raw data set) cannot be used; the message names file and problem."""

    code = "data_error"


class ModelError(FedlinkError):
    """A model factory path is malformed, cannot be imported, or did not return a ``torch.nn.Module``."""

    code = "model_error"


class ModelNotAllowed(ModelError):
    """The factory is outside the operator's allow-list; nothing was imported."""

    code = "model_not_allowed"
