"""The reference experiments of examples/, with real worker processes: SMS spam's ROC AUC, and a short version of
the pathological non-IID MNIST comparison (the full one is ``python examples/mnist-noniid/compare.py``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers

from .conftest import ROOT


def _example(name: str, urls: list[str], data: Path, out: Path, **changes: object) -> list[dict[str, object]]:
    config = yaml.safe_load((ROOT / "examples" / name / "config.yaml").read_text())
    config.update(workers=urls, output=str(out), **changes)
    config["evaluation"]["data"] = str(data / "test.npy")
    return asyncio.run(Coordinator(parse_config(config)).run())


def test_sms_spam_gru_reaches_roc_auc_099_within_5_rounds_for_three_seeds(sms2: Path, tmp_path: Path) -> None:
    """The example's job as is, for run seeds 0, 1 and 2 (each gives the workers other seeds: other batch orders)."""
    workers = start_workers([sms2 / "shard-0.npy", sms2 / "shard-1.npy"], extra_args=["--threads", "1"])
    try:
        histories = {seed: _example("sms-spam", [w.url for w in workers], sms2, tmp_path / f"run-{seed}", seed=seed)
                     for seed in (0, 1, 2)}
    finally:
        stop_workers(workers)
    aucs = {seed: [round(h["roc_auc"], 4) for h in history] for seed, history in histories.items()}
    assert all(len(history) == 5 and all(h["workers"] == 2 for h in history) for history in histories.values())
    assert all(max(curve) >= 0.99 for curve in aucs.values()), aucs
    # Different seeds must give different runs, or the three would prove no more than one.
    assert len({tuple(curve) for curve in aucs.values()}) == 3, aucs


def test_pathological_noniid_mnist_learns_with_half_the_workers_per_round(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", "10", "--classes-per-worker", "2",
         "--root", str(shared_data), "--out", str(data)],
        check=True, capture_output=True, timeout=120,
    )
    workers = start_workers([data / f"shard-{i}.npy" for i in range(10)], extra_args=["--threads", "1"])
    try:
        history = _example("mnist-noniid", [w.url for w in workers], data, tmp_path / "run", rounds=8,
                           strategy={"name": "fedavgm", "server_lr": 1.0, "momentum": 0.7})
    finally:
        stop_workers(workers)
    assert all(h["selected"] == 5 and h["workers"] == 5 for h in history)
    # With two classes per worker a single round cannot see every class; after 8 rounds the model must have learnt
    # well beyond chance (10%), which it only does if aggregation across skewed workers works.
    assert history[-1]["accuracy"] > 0.6, [h["accuracy"] for h in history]


@pytest.mark.slow
def test_full_noniid_comparison(tmp_path: Path) -> None:
    """The README's comparison: some strategy reaches 95% within 25 rounds, and SCAFFOLD before FedAvg."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist-noniid" / "compare.py"), "--out", str(tmp_path)], timeout=5400)
    assert done.returncode == 0
    summary = {row["label"]: row for row in map(json.loads, (tmp_path / "summary.jsonl").read_text().splitlines())}
    reached = {label: row["rounds_to_95"] or 10**6 for label, row in summary.items()}
    assert min(reached.values()) <= 25, reached
    assert reached["scaffold"] < reached["fedavg"], reached
    assert "scaffold" in (tmp_path / "compare.md").read_text()
