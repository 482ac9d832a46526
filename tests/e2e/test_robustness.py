"""Robust aggregation against a malicious worker process: one of five MNIST workers sends its update
sign-flipped and scaled by 10. FedAvg collapses; median, trimmed mean and Krum stay close to a clean FedAvg run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.errors import NotEnoughWorkers
from fedlink.server.localworkers import LocalWorker, start_worker, start_workers, stop_workers

from .faulty_worker import __file__ as FAULTY_SCRIPT

ROUNDS = 8


def _job(urls: list[str], data: Path, out: Path, strategy: dict[str, Any]) -> float:
    config = parse_config(
        {
            "name": "robustness",
            "seed": 0,
            "model": {"factory": "fedlink.models:mnist_cnn"},
            "workers": urls,
            "rounds": ROUNDS,
            "sampling": {"min_workers": 5},
            "training": {"epochs": 1, "batch_size": 32, "optimizer": {"lr": 0.05, "momentum": 0.9}},
            "strategy": strategy,
            "timeouts": {"round_retries": 0},
            "evaluation": {"data": str(data / "test.npy"), "every": ROUNDS},
            "output": str(out),
        }
    )
    history = asyncio.run(Coordinator(config).run())
    assert all(h["workers"] == 5 for h in history)
    return float(history[-1]["accuracy"])


@pytest.fixture(scope="module")
def federation(mnist5: Path) -> Any:
    import sys

    honest = start_workers([mnist5 / f"shard-{i}.npy" for i in range(5)], extra_args=["--threads", "1"])
    evil: LocalWorker | None = None
    try:
        evil = start_worker(
            mnist5 / "shard-4.npy", worker_id="worker-4", command=[sys.executable, FAULTY_SCRIPT, "signflip"],
            extra_args=["--threads", "1"], log_path=mnist5 / "evil.log",
        )
        yield mnist5, [w.url for w in honest], [w.url for w in honest[:4]] + [evil.url]
    finally:
        stop_workers(honest + ([evil] if evil else []))


def test_fedavg_collapses_and_robust_strategies_hold(federation: Any, tmp_path: Path) -> None:
    data, clean_urls, attacked_urls = federation
    clean = _job(clean_urls, data, tmp_path / "clean", {"name": "fedavg"})
    try:
        attacked = _job(attacked_urls, data, tmp_path / "fedavg", {"name": "fedavg"})
    except NotEnoughWorkers as exc:
        # The poisoned average diverges so far that every worker's next training step fails: a total collapse.
        # The collapse shows as NaN losses, or (limits.max_update_norm) as every update refused for its norm.
        assert "loss became nan" in str(exc) or "exceeds limits.max_update_norm" in str(exc)
        attacked = 0.0
    robust = {
        name: _job(attacked_urls, data, tmp_path / name, strategy)
        for name, strategy in {
            "median": {"name": "median"},
            "trimmed_mean": {"name": "trimmed_mean", "beta": 0.2},
            "krum": {"name": "krum", "num_byzantine": 1},
        }.items()
    }
    print(f"\nclean FedAvg {clean:.4f}; attacked FedAvg {attacked:.4f}; " + "; ".join(f"{k} {v:.4f}" for k, v in robust.items()))
    assert clean > 0.95, clean
    assert attacked < 0.5, f"FedAvg should collapse under the attack, got {attacked:.4f} (clean {clean:.4f})"
    for name, accuracy in robust.items():
        assert accuracy >= clean - 0.02, f"{name}: {accuracy:.4f} vs clean FedAvg {clean:.4f}"
