"""Errors of the worker daemon; each ``code`` is what the coordinator receives in the ``error`` reply.

::

    WorkerError
    ├── WorkerBusy          another job is running (one job at a time)
    ├── BadRequest          the request cannot be served as asked (wrong state for the model, bad kwargs)
    │   └── CacheMiss       the request sends part of the global state, and the worker does not keep the rest
    └── PolicyRefused       the worker operator's policy does not allow it (names the rule and its flag)
"""

from __future__ import annotations

from fedlink.errors import FedlinkError

__all__ = ["WorkerError", "WorkerBusy", "BadRequest", "CacheMiss", "PolicyRefused"]


class WorkerError(FedlinkError):
    code = "worker_error"


class WorkerBusy(WorkerError):
    code = "busy"


class BadRequest(WorkerError):
    code = "bad_request"


class CacheMiss(BadRequest):
    code = "cache_miss"


class PolicyRefused(WorkerError):
    code = "policy_refused"
