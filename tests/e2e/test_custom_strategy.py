"""A user's own strategy, loaded by dotted path from the config, trains end to end with real workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers

STRATEGY = '''
from fedlink.server.strategy.base import Strategy, check_float
from fedlink.server.strategy.updates import MeanAggregation, apply_pseudo_gradient

ROUNDS_SEEN = []


class Halfway(Strategy):
    """Moves the global model ``fraction`` of the way towards the workers' sample-weighted mean."""

    name = "halfway"

    def __init__(self, *, fraction=0.5):
        self.fraction = check_float("fraction", fraction, low=0, high=1, low_open=True, high_open=False)

    def begin_round(self, server_round, global_state):
        ROUNDS_SEEN.append(server_round)
        return MeanAggregation(global_state, self._finish)

    def _finish(self, kind, global_state, mean):
        return apply_pseudo_gradient(kind, global_state, mean, lambda name, delta: delta * self.fraction)
'''


def test_strategy_by_dotted_path_trains(digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_lab_strategies.py").write_text(STRATEGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    shards, test = digit_shards
    workers = start_workers(shards, extra_args=["--threads", "1"])
    try:
        config = parse_config(
            {
                "name": "custom",
                "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}},
                "workers": [w.url for w in workers],
                "rounds": 4,
                "training": {"epochs": 2, "optimizer": {"lr": 0.1, "momentum": 0.9}},
                "strategy": {"name": "my_lab_strategies:Halfway", "fraction": 0.8},
                "evaluation": {"data": str(test)},
                "output": str(tmp_path / "run"),
            }
        )
        coordinator = Coordinator(config)
        history = asyncio.run(coordinator.run())
    finally:
        stop_workers(workers)
    import my_lab_strategies  # type: ignore[import-not-found]

    assert type(coordinator.strategy).__name__ == "Halfway" and coordinator.strategy.fraction == 0.8
    assert my_lab_strategies.ROUNDS_SEEN == [1, 2, 3, 4]
    assert history[-1]["accuracy"] > 0.85
