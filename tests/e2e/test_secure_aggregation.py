"""Secure aggregation with real worker processes: dropouts at two stages, exact sums, accuracy, the wire."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedlink.secagg.server as secagg_server
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.errors import NotEnoughWorkers
from fedlink.server.localworkers import spawn_worker, stop_workers, wait_ready

HERE = Path(__file__).resolve().parent
INSTRUMENTED = [sys.executable, str(HERE / "secure_worker.py")]
MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}}


def _shards(digits: tuple[Any, Any], folder: Path, n: int) -> tuple[list[Path], Path]:
    from fedlink.server.split import partition_iid
    from fedlink.shards import save_shard

    x, y = digits
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test, train = order[:297], order[297:]
    shards = [save_shard(folder / f"shard-{i}.npy", x[train[p]], y[train[p]]) for i, p in enumerate(partition_iid(len(train), n, rng))]
    return shards, save_shard(folder / "test.npy", x[test], y[test])


def test_dropouts_before_and_after_masking_leave_the_exact_sum_of_the_survivors(
    digits: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    shards, test = _shards(digits, tmp_path, 6)
    die = {1: "masked_input", 4: "unmask"}  # worker-1 is lost before masking, worker-4 after its masked input
    spawned = [
        spawn_worker(shard, worker_id=f"worker-{i}", command=INSTRUMENTED, extra_args=["--threads", "1"],
                     env={"FEDLINK_TEST_VECTORS": str(vectors), "FEDLINK_TEST_DIE_AT": die.get(i, "")})
        for i, shard in enumerate(shards)
    ]
    workers = [wait_ready(s) for s in spawned]
    sums: list[np.ndarray] = []
    finish = secagg_server.ServerSecAgg.finish

    def record(self: Any) -> Any:
        total = finish(self)
        sums.append(total.copy())
        return total

    monkeypatch.setattr(secagg_server.ServerSecAgg, "finish", record)
    try:
        config = parse_config({
            "name": "secure-dropouts", "seed": 3, "model": MLP, "workers": [w.url for w in workers], "rounds": 1,
            "sampling": {"min_workers": 4},
            "training": {"epochs": 1, "update": "delta", "optimizer": {"lr": 0.1, "momentum": 0.9}},
            "secure_aggregation": {"clip_norm": 10, "bits": 32, "timeouts": {"keys": 20, "unmask": 20}},
            "timeouts": {"round": 60, "round_retries": 0, "reconnect_max": 1},
            "evaluation": {"data": str(test)},
            "output": str(tmp_path / "run"),
        })
        history = asyncio.run(asyncio.wait_for(Coordinator(config).run(), 180))
    finally:
        stop_workers(workers)
    assert len(sums) == 1 and history[0]["workers"] == 5, history[0]
    survivors = [i for i in range(6) if i != 1]  # worker-4's masked input is in the sum: it counts
    plain = sum(np.load(vectors / f"worker-{i}-r1.npy").astype(np.uint64) for i in survivors) % (1 << 32)
    assert not (vectors / "worker-1-r1.npy").exists()
    assert np.array_equal(sums[0].astype(np.uint64), plain), "the unmasked sum is exactly the survivors' plain sum"
    lines = [json.loads(line) for line in (tmp_path / "run" / "workers.jsonl").read_text().splitlines()]
    dropped = {(line["worker"], line["stage"]) for line in lines if line["status"] == "dropped"}
    assert ("worker-1", "train") in dropped and ("worker-4", "unmask") in dropped, dropped
    assert all(line["samples"] == 0 and not line["metrics"] for line in lines), "nothing per worker in the clear"


def _accuracy_job(shards: list[Path], test: Path, out: Path, secure: bool) -> list[dict[str, Any]]:
    workers = [wait_ready(spawn_worker(s, worker_id=f"worker-{i}", extra_args=["--threads", "1"])) for i, s in enumerate(shards)]
    try:
        config: dict[str, Any] = {
            "name": "secure-quality", "seed": 5, "model": MLP, "workers": [w.url for w in workers], "rounds": 3,
            "sampling": {"min_workers": len(shards)},
            "training": {"epochs": 1, "update": "delta", "optimizer": {"lr": 0.1, "momentum": 0.9}},
            "evaluation": {"data": str(test)}, "output": str(out),
        }
        if secure:
            config["secure_aggregation"] = {"clip_norm": 10}
        return asyncio.run(asyncio.wait_for(Coordinator(parse_config(config)).run(), 180))
    finally:
        stop_workers(workers)


def test_secure_rounds_learn_like_plain_fedavg(digits: tuple[Any, Any], tmp_path: Path) -> None:
    shards, test = _shards(digits, tmp_path, 4)
    plain = _accuracy_job(shards, test, tmp_path / "plain", secure=False)
    secure = _accuracy_job(shards, test, tmp_path / "secure", secure=True)
    assert abs(secure[-1]["accuracy"] - plain[-1]["accuracy"]) <= 0.005, (plain[-1], secure[-1])
    assert secure[-1]["samples"] == plain[-1]["samples"], "the total weight comes out of the masked sum"


@pytest.mark.slow
def test_mnist_ten_workers_secure_within_half_a_point_of_plain(shared_data: Path, tmp_path: Path) -> None:
    """The acceptance job: MNIST, 10 real workers, IID, 10 rounds, clip_norm 10 (about 15 minutes here)."""
    import subprocess

    from .conftest import ROOT

    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", "10", "--root",
         str(shared_data), "--out", str(tmp_path / "data")],
        check=True, capture_output=True, timeout=300,
    )
    shards = [tmp_path / "data" / f"shard-{i}.npy" for i in range(10)]
    results = {}
    for secure in (False, True):
        workers = [wait_ready(spawn_worker(s, worker_id=f"worker-{i}", extra_args=["--threads", "1"])) for i, s in enumerate(shards)]
        try:
            config: dict[str, Any] = {
                "name": "mnist-secure", "seed": 0, "model": {"factory": "fedlink.models:mnist_cnn", "kwargs": {}},
                "workers": [w.url for w in workers], "rounds": 10, "sampling": {"min_workers": 10},
                "training": {"epochs": 1, "batch_size": 32, "update": "delta", "optimizer": {"lr": 0.05, "momentum": 0.9}},
                "timeouts": {"round": 900}, "evaluation": {"data": str(tmp_path / "data" / "test.npy")},
                "output": str(tmp_path / ("secure" if secure else "plain")),
            }
            if secure:
                config["secure_aggregation"] = {"clip_norm": 10}
            results[secure] = asyncio.run(Coordinator(parse_config(config)).run())
        finally:
            stop_workers(workers)
    plain, secure_run = results[False][-1]["accuracy"], results[True][-1]["accuracy"]
    print(f"MNIST 10 workers, 10 rounds: plain {plain:.4f}, secure {secure_run:.4f}")
    assert abs(plain - secure_run) <= 0.005


def test_a_coordinator_listing_a_worker_both_alive_and_dropped_gets_nothing(
    digits: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack on double masking: ask for both kinds of share of one worker, to strip all its masks."""
    shards, test = _shards(digits, tmp_path, 4)
    workers = [wait_ready(spawn_worker(s, worker_id=f"worker-{i}", extra_args=["--threads", "1"])) for i, s in enumerate(shards)]
    honest = secagg_server.ServerSecAgg.unmask_requests

    def lying(self: Any) -> Any:
        requests = honest(self)
        return {w: r.model_copy(update={"dropped": [*r.dropped, "worker-0"]}) for w, r in requests.items()}

    monkeypatch.setattr(secagg_server.ServerSecAgg, "unmask_requests", lying)
    released: list[Any] = []
    monkeypatch.setattr(secagg_server.ServerSecAgg, "finish", lambda self: released.append(self) or None)
    try:
        config = parse_config({
            "name": "lying-coordinator", "seed": 3, "model": MLP, "workers": [w.url for w in workers], "rounds": 1,
            "sampling": {"min_workers": 4}, "training": {"epochs": 1, "update": "delta"},
            "secure_aggregation": {"clip_norm": 10}, "timeouts": {"round": 60, "round_retries": 0},
            "evaluation": {"data": str(test)}, "output": str(tmp_path / "run"),
        })
        with caplog.at_level(logging.WARNING, logger="fedlink.server"), pytest.raises(NotEnoughWorkers):
            asyncio.run(asyncio.wait_for(Coordinator(config).run(), 180))
    finally:
        stop_workers(workers)
    refusals = [r.getMessage() for r in caplog.records if "at stage unmask" in r.getMessage()]
    assert len(refusals) == 4 and all("alive and dropped" in message for message in refusals), refusals
    assert not released, "no worker gave out a share that would unmask anyone"
