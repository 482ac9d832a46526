"""Compressed updates between real processes: ``fl-worker`` daemons started through the CLI, on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fedlink.compression import CompressionSpec, wire_header
from fedlink.models import mlp
from fedlink.protocol.tensors import header_of
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_worker, start_workers, stop_workers
from fedlink.server.progress import Progress
from fedlink.models import sized_mlp

HERE = Path(__file__).resolve().parent
FAULTY = [sys.executable, str(HERE / "faulty_worker.py")]
KWARGS = {"in_features": 64, "hidden": 64, "num_classes": 10}
DENSE = header_of(mlp(**KWARGS).state_dict())  # type: ignore[arg-type]


def _config(urls: list[str], out: Path, test: Path, compression: dict[str, Any], **training: Any) -> dict[str, Any]:
    return {
        "name": "compression-e2e",
        "seed": 2,
        "model": {"factory": "fedlink.models:mlp", "kwargs": KWARGS},
        "workers": urls,
        "rounds": 4,
        "sampling": {"min_workers": 2},
        "training": {"update": "delta", "epochs": 5, "optimizer": {"lr": 0.05, "momentum": 0.9},
                     "compression": compression, **training},
        "evaluation": {"data": str(test)},
        "timeouts": {"round": 60, "heartbeat": 1.0, "reconnect_max": 0.5, "wait_for_workers": 30, "connect": 5},
        "output": str(out),
    }


async def test_topk_uploads_and_a_float16_download_between_real_workers(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    """Top-k 1% with error feedback on every tensor (``dense_below: 0``): each worker uploads 2% of the dense bytes,
    and the model still learns."""
    shards, test = digit_shards
    workers = start_workers(shards, extra_args=["--threads", "1"])
    try:
        config = parse_config(_config([w.url for w in workers], tmp_path / "run", test,
                                      {"name": "topk", "ratio": 0.01, "dense_below": 0}, download="float16"))
        history = await asyncio.wait_for(Coordinator(config, progress=Progress()).run(), 240)
    finally:
        stop_workers(workers)
    topk = wire_header(DENSE, CompressionSpec(name="topk", ratio=0.01, dense_below=0)).nbytes
    assert topk / DENSE.nbytes < 0.03
    for record in history:
        assert record["workers"] == 3, record["dropped"]
        assert record["upload_bytes"] == 3 * topk and record["download_bytes"] == 3 * DENSE.nbytes // 2
    assert history[-1]["accuracy"] > 0.5, [r["accuracy"] for r in history]
    assert history[-1]["accuracy"] > history[0]["accuracy"]


@pytest.mark.parametrize(
    ("mode", "compression", "spill"),
    [("topk-index", {"name": "topk", "ratio": 0.05}, False), ("int8-scale", {"name": "int8"}, False),
     ("topk-index", {"name": "topk", "ratio": 0.05}, True)],
    ids=["topk-index", "int8-scale", "topk-index-spilled"],
)
async def test_a_worker_sending_an_undecodable_update_is_dropped_by_name(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, mode: str, compression: dict[str, Any], spill: bool
) -> None:
    """An index past the tensor or an infinite scale could write out of bounds or poison the sum: the coordinator
    refuses the update, names the worker and the tensor, and the round goes on with the honest two. Spilled (every
    update received to disk as sent), the indices are checked from there, before any of the update is decoded."""
    shards, test = digit_shards
    workers = start_workers(shards[:2], extra_args=["--threads", "1"])
    workers.append(start_worker(shards[2], worker_id="bad", command=[*FAULTY, mode], extra_args=["--threads", "1"]))
    try:
        config = _config([w.url for w in workers], tmp_path / "run", test, compression)
        limits = {"spill_bytes": 0, "spill_dir": str(tmp_path)} if spill else {}
        config = parse_config({**config, "rounds": 2, "limits": limits})
        history = await asyncio.wait_for(Coordinator(config, progress=Progress()).run(), 240)
    finally:
        stop_workers(workers)
    for record in history:
        assert record["workers"] == 2
        assert f"undecodable {compression['name']} update: tensor '" in record["dropped"]["bad"]
        assert (record["spilled_bytes"] == record["upload_bytes"] > 0) if spill else record["spilled_bytes"] == 0
    assert history[-1]["accuracy"] > 0.8


class _RestartAfter(Progress):
    """Kills a worker process and starts it again (same port, same id) when round ``after`` has ended."""

    def __init__(self, worker: Any, after: int) -> None:
        self.worker, self.after = worker, after

    def round_finished(self, record: dict[str, Any]) -> None:
        if record["round"] == self.after:
            self.worker.kill()
            self.worker.restart()


async def test_a_frozen_backbone_goes_down_once_and_again_only_to_a_restarted_worker(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    """Real processes: round 1 sends everything, later rounds only the head; a worker killed and restarted after
    round 2 has lost what it kept, and is sent everything again, without missing a round."""
    shards, test = digit_shards
    kwargs = {"megabytes": 0.25, "in_features": 64, "num_classes": 10, "frozen_backbone": True}
    model = sized_mlp(**kwargs)  # type: ignore[arg-type]
    full = header_of(model.state_dict()).nbytes
    head = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    workers = start_workers(shards[:2], extra_args=["--threads", "1"])
    try:
        config = _config([w.url for w in workers], tmp_path / "run", test, {"name": "none"})
        config["model"] = {"factory": "fedlink.models:sized_mlp", "kwargs": kwargs}
        config["rounds"] = 4
        history = await asyncio.wait_for(
            Coordinator(parse_config(config), progress=_RestartAfter(workers[1], after=2)).run(), 240
        )
    finally:
        stop_workers(workers)
    assert [r["workers"] for r in history] == [2, 2, 2, 2], [r["dropped"] for r in history]
    records = [json.loads(line) for line in (tmp_path / "run" / "workers.jsonl").read_text().splitlines()]
    fulls = {name: [r["round"] for r in records if r["worker"] == name and r.get("download_bytes") == full]
             for name in ("worker-0", "worker-1")}
    # worker-0 gets the backbone once; worker-1 once more after its restart (round 3 or 4: rounds run while the one
    # before is recorded). Every other request carries the head at most (nothing, to a worker asked again for a
    # round it already has the state of).
    assert fulls["worker-0"] == [1] and fulls["worker-1"][0] == 1 and fulls["worker-1"][1] in (3, 4), fulls
    assert len(fulls["worker-1"]) == 2
    assert all(r.get("download_bytes", 0) in (0, head, full) for r in records)
    assert {r["upload_bytes"] for r in records if r["status"] == "ok"} == {head}  # the backbone never goes back
