"""Asynchronous FedBuff with real worker processes, one of them eight times slower than the others."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import spawn_worker, stop_workers, wait_ready


def _config(urls: list[str], test: Path, out: Path, rounds: int) -> dict[str, Any]:
    return {
        "name": "fedbuff",
        "seed": 2,
        "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}},
        "workers": urls,
        "rounds": rounds,
        "sampling": {"min_workers": 3},
        "training": {"epochs": 1, "update": "delta", "optimizer": {"lr": 0.1, "momentum": 0.9}},
        "strategy": {"name": "fedbuff", "buffer_size": 2},
        "evaluation": {"data": str(test)},
        "output": str(out),
    }


def test_fedbuff_updates_every_k_results_and_resumes(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, test = digit_shards
    spawned = [
        spawn_worker(shard, worker_id=f"worker-{i}", extra_args=["--threads", "1", *(["--slowdown", "8"] if i == 0 else [])])
        for i, shard in enumerate(shards)
    ]
    workers = [wait_ready(s) for s in spawned]
    try:
        urls = [w.url for w in workers]
        history = asyncio.run(asyncio.wait_for(Coordinator(parse_config(_config(urls, test, tmp_path / "run", 6))).run(), 240))
        resumed = asyncio.run(
            asyncio.wait_for(Coordinator(parse_config(_config(urls, test, tmp_path / "run", 14))).run(resume=True), 240)
        )
    finally:
        stop_workers(workers)
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert all(r["workers"] == 2 for r in history), "each server update folds exactly buffer_size results"
    assert all("staleness_mean" in r and r["staleness_max"] >= 0 for r in history)
    assert history[-1]["accuracy"] > 0.8
    assert [r["round"] for r in resumed] == list(range(1, 15)), "resume continues the server updates"
    # Counted over the resumed run alone: in the first, whichever worker process warmed up first (imports, the
    # model's first build) can take most of the results before the others answer at all.
    lines = [json.loads(line) for line in (tmp_path / "run" / "workers.jsonl").read_text().splitlines()]
    lines = [line for line in lines if line["round"] > 6]
    taken = {w: sum(1 for line in lines if line["worker"] == w and line["status"] == "ok") for w in ("worker-0", "worker-1", "worker-2")}
    assert taken["worker-0"] < min(taken["worker-1"], taken["worker-2"]), f"the slow worker contributes least: {taken}"


def test_an_update_that_would_overflow_the_buffer_drops_only_that_result(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    """Two workers send every value as 3e38 (finite float32) with the norm limit lifted: the first fits the
    buffer's sum, the second would overflow it. That result is refused by name and the sender is asked again;
    the slow honest worker's result then completes the buffer."""
    shards, test = digit_shards
    faulty = [sys.executable, str(Path(__file__).resolve().parent / "faulty_worker.py"), "huge"]
    honest = spawn_worker(shards[0], worker_id="worker-0", extra_args=["--threads", "1", "--slowdown", "8"])
    attackers = [
        spawn_worker(shard, worker_id=f"worker-{i}", command=faulty, extra_args=["--threads", "1"])
        for i, shard in enumerate(shards[1:3], start=1)
    ]
    workers = [wait_ready(s) for s in (honest, *attackers)]
    config = _config([w.url for w in workers], test, tmp_path / "run", 1)
    config["limits"] = {"max_update_norm": 1e308}
    try:
        history = asyncio.run(asyncio.wait_for(Coordinator(parse_config(config)).run(), 240))
    finally:
        stop_workers(workers)
    assert [r["round"] for r in history] == [1]
    assert history[0]["workers"] == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "workers.jsonl").read_text().splitlines()]
    taken = sorted(line["worker"] for line in lines if line["status"] == "ok")
    assert taken[0] == "worker-0" and taken[1] in ("worker-1", "worker-2"), taken
    refused = [line for line in lines if line["status"] != "ok"]
    assert refused and all("would overflow the buffer's sum" in line["reason"] for line in refused), refused
