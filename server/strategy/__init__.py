"""Aggregation strategies, by config name or by dotted path (``my_pkg.module:MyStrategy``)."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import Aggregation, ClientUpdate, Strategy
from .fedavg import FedAvg

__all__ = ["Aggregation", "ClientUpdate", "Strategy", "FedAvg", "STRATEGIES", "build_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {FedAvg.name: FedAvg}


def _import(path: str) -> type[Strategy]:
    module_name, _, attr = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy.name: cannot import {path!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise ConfigError(f"strategy.name: {path!r} is not a subclass of fedlink.server.strategy.Strategy")
    return found


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
        raise ConfigError(f"strategy {name!r} with parameters {params}: {exc}") from exc
