"""Aggregation strategies, by config name or by dotted path (``my_pkg.module:MyStrategy``).

Streaming (one running sum): fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi, scaffold, fednova; asynchronous: fedbuff. Holding every update of a
round in memory: median, trimmed_mean, krum, multi_krum (see :mod:`.robust`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..errors import ConfigError
from .base import Aggregation, ClientUpdate, Strategy, TooFewUpdates
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedbuff import FedBuff
from .fednova import FedNova
from .fedprox import FedProx
from .fedyogi import FedYogi
from .krum import Krum
from .median import Median
from .multi_krum import MultiKrum
from .scaffold import Scaffold
from .trimmed_mean import TrimmedMean

__all__ = [
    "Aggregation",
    "ClientUpdate",
    "Strategy",
    "TooFewUpdates",
    "FedAvg",
    "FedProx",
    "FedAvgM",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "FedBuff",
    "Scaffold",
    "FedNova",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
    "STRATEGIES",
    "build_strategy",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi, Scaffold, FedNova, FedBuff, Median, TrimmedMean, Krum, MultiKrum
    )
}


def _import(path: str) -> type[Strategy]:
    module_name, _, attr = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"strategy.name: cannot import {path!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise ConfigError(f"strategy.name: {path!r} is not a subclass of fedlink.server.strategy.Strategy")
    if inspect.isabstract(found):
        raise ConfigError(f"strategy.name: {path!r} is abstract (it does not implement begin_round)")
    return found


def _accepted(cls: type[Strategy]) -> str:
    """``"; it accepts mu (required), server_lr=1.0"``, for messages about parameters."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return ""
    described = [
        f"{p.name} (required)" if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        for p in parameters
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return f"; it accepts {', '.join(described)}" if described else "; it takes no parameters"


def build_strategy(name: str, params: dict[str, Any]) -> Strategy:
    """A strategy from its config name (see :data:`STRATEGIES`) or ``module:Class``, with ``params`` as kwargs."""
    if ":" in name:
        cls = _import(name)
    elif name in STRATEGIES:
        cls = STRATEGIES[name]
    else:
        raise ConfigError(
            f"strategy.name = {name!r}: unknown strategy; expected one of {', '.join(sorted(STRATEGIES))} "
            "or a dotted path module:Class"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name!r} with parameters {params}: {exc}{_accepted(cls)}") from exc
