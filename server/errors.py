"""Errors of the coordinator.

::

    CoordinatorError
    ├── ConfigError         the job configuration is invalid; the message names key, value and expectation
    ├── NotEnoughWorkers    fewer than ``sampling.min_workers`` reachable, or answered in a round
    ├── InvalidUpdate       a worker's result was refused (NaN, wrong tensors, absurd sample count)
    └── RoundRefused        a round's new global state was refused (not finite); the previous one stands
"""

from __future__ import annotations

from fedlink.errors import FedlinkError

__all__ = ["CoordinatorError", "ConfigError", "NotEnoughWorkers", "InvalidUpdate", "RoundRefused"]


class CoordinatorError(FedlinkError):
    code = "coordinator_error"


class ConfigError(CoordinatorError):
    code = "config_error"


class NotEnoughWorkers(CoordinatorError):
    code = "not_enough_workers"


class InvalidUpdate(CoordinatorError):
    code = "invalid_update"


class RoundRefused(CoordinatorError):
    code = "round_refused"
