"""``fl-coordinator demo``: a whole federation on this machine, from nothing but the installed packages.

scikit-learn's bundled handwritten digits (1,797 8x8 images) are split IID over three local ``fl-worker``
processes on loopback; a few FedAvg rounds of the built-in MLP follow, with held-out accuracy each round.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlink.datasets import load_digits
from fedlink.shards import save_shard

from .config import JobConfig, parse_config
from .coordinator import Coordinator
from .localworkers import LocalWorker, start_workers, stop_workers
from .progress import Progress
from .split import partition_iid

__all__ = ["DemoResult", "prepare_demo_data", "run_demo"]

log = logging.getLogger("fedlink.server")


@dataclass
class DemoResult:
    history: list[dict[str, Any]]
    output: Path

    @property
    def accuracy(self) -> float:
        return float(self.history[-1]["accuracy"])


def prepare_demo_data(folder: Path, *, workers: int, seed: int) -> tuple[list[Path], Path]:
    """Shuffle the digits, keep 297 as the held-out set, split the rest IID into one shard per worker."""
    x, y = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, train = order[:297], order[297:]
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, part in enumerate(partition_iid(len(train), workers, rng)):
        shards.append(save_shard(data / f"shard-{i}.npy", x[train[part]], y[train[part]]))
    test_path = save_shard(data / "test.npy", x[test], y[test])
    return shards, test_path


def demo_config(urls: list[str], *, test: Path, output: Path, rounds: int, seed: int, token: Path | None = None) -> JobConfig:
    return parse_config(
        {
            "name": "digits-demo",
            "seed": seed,
            "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}},
            "workers": urls,
            "rounds": rounds,
            "sampling": {"fraction": 1.0, "min_workers": len(urls)},
            "training": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
            "strategy": {"name": "fedavg"},
            "timeouts": {"round": 120},
            "evaluation": {"data": str(test), "every": 1},
            "output": str(output),
            **({"auth": {"token_file": str(token)}} if token is not None else {}),
        },
        source="demo",
    )


def run_demo(folder: Path, *, workers: int = 3, rounds: int = 5, seed: int = 0, progress: Progress | None = None) -> DemoResult:
    """Start the workers, train, and always stop the workers (also on Ctrl-C)."""
    shards, test = prepare_demo_data(folder, workers=workers, seed=seed)
    # Even on loopback the demo's workers and coordinator prove to each other that they share a secret.
    token = folder / "token"
    token.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
    token.chmod(0o600)
    started: list[LocalWorker] = []
    try:
        started = start_workers(shards, extra_args=["--threads", "1", "--token-file", str(token)])
        for worker in started:
            log.info("started worker (pid %d) on %s", worker.pid, worker.url)
        config = demo_config([w.url for w in started], test=test, output=folder, rounds=rounds, seed=seed, token=token)
        with progress or Progress() as shown:
            coordinator = Coordinator(config, progress=shown)
            history = asyncio.run(coordinator.run())
        return DemoResult(history=history, output=folder)
    finally:
        stop_workers(started)
