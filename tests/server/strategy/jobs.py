"""Whole jobs of a strategy over in-memory workers (the real daemon, session and round engine, no sockets)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlink.protocol.messages import Hello
from fedlink.server.coordinator import Coordinator
from fedlink.server.split import partition_classes
from fedlink.shards import save_shard

from ..inmemory_jobs import run_in_memory

HELLO = Hello(role="coordinator", peer_id="test")
MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}}


@dataclass
class Job:
    coordinator: Coordinator
    out: Path

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.coordinator.history

    def trained_metrics(self) -> dict[str, list[dict[str, float]]]:
        """Each worker's train-stage metrics, round by round, from ``workers.jsonl``."""
        out: dict[str, list[dict[str, float]]] = {}
        for line in (self.out / "workers.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["stage"] == "train" and record["status"] == "ok":
                out.setdefault(record["worker"], []).append(record["metrics"])
        return out


def label_skewed_digits(
    folder: Path, digits: tuple[np.ndarray, np.ndarray], *, workers: int, classes: int
) -> tuple[list[Path], Path]:
    """scikit-learn's digits over ``workers`` shards of ``classes`` labels each (McMahan's split), and a test set."""
    x, y = digits
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test, train = order[:297], order[297:]
    parts = partition_classes(y[train], workers, classes, np.random.default_rng(0))
    shards = [save_shard(folder / f"shard-{i}.npy", x[train[p]], y[train[p]]) for i, p in enumerate(parts)]
    return shards, save_shard(folder / "test.npy", x[test], y[test])


async def run_job(shards: list[Path], out: Path, config: dict[str, Any], *, model: dict[str, Any] | None = None) -> Job:
    """Run a job of ``config`` (over the defaults below) against one in-memory worker per shard."""
    defaults = {"name": "strategy-job", "seed": 1, "model": model or MLP, "rounds": 3, "output": str(out)}
    return Job(await run_in_memory(shards, {**defaults, **config}), out)
