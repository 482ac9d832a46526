"""The reference experiments of examples/, with real worker processes: SMS spam's ROC AUC, and a short version of
the pathological non-IID MNIST comparison (the full one is ``python examples/mnist-noniid/compare.py``)."""

from __future__ import annotations

import asyncio
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


def test_sms_spam_gru_reaches_roc_auc_0975(sms2: Path, tmp_path: Path) -> None:
    workers = start_workers([sms2 / "shard-0.npy", sms2 / "shard-1.npy"], extra_args=["--threads", "1"])
    try:
        history = _example("sms-spam", [w.url for w in workers], sms2, tmp_path / "run")
    finally:
        stop_workers(workers)
    assert len(history) == 15 and all(h["workers"] == 2 for h in history)
    assert history[-1]["roc_auc"] >= 0.975, [round(h["roc_auc"], 4) for h in history]


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
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist-noniid" / "compare.py"), "--out", str(tmp_path)], timeout=3600)
    assert done.returncode == 0
    table = (tmp_path / "compare.md").read_text()
    assert "fedavgm" in table
