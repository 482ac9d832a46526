"""Secure aggregation through the engine with in-memory workers: what reaches the coordinator, and refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fedlink.factory import ModelAllowList
from fedlink.protocol.channel import MemoryChannel, memory_pair
from fedlink.protocol.connect import open_session
from fedlink.protocol.frames import DataFrame, decode_frame
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello, StageResult, TrainResult
from fedlink.protocol.session import SessionOptions
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.errors import ConfigError
from fedlink.server.remote import RemoteWorker
from fedlink.shards import load_shard
from fedlink.worker.daemon import WorkerDaemon
from fedlink.worker.service import WorkerService

MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}}


class Recording(MemoryChannel):
    """The coordinator's end of a channel, keeping every frame the coordinator receives."""

    def __init__(self, inner: MemoryChannel, seen: list[bytes]) -> None:
        super().__init__(inner._inbox, inner._outbox, inner._closed, inner.peer)
        self.seen = seen

    async def recv(self) -> bytes | str:
        data = await super().recv()
        self.seen.append(bytes(data))  # type: ignore[arg-type]
        return data


async def _secure_job(shards: list[Path], out: Path, seen: list[bytes]) -> list[dict[str, Any]]:
    remotes, daemons, served = [], [], []
    for i, shard in enumerate(shards):
        daemon = WorkerDaemon(WorkerService(load_shard(shard), allow=ModelAllowList(), worker_id=f"worker-{i}"))
        coordinator_end, worker_end = memory_pair("coordinator", f"worker-{i}")
        served.append(asyncio.ensure_future(daemon.serve_channel(worker_end)))
        session = await open_session(
            Recording(coordinator_end, seen), Hello(role="coordinator", peer_id="c"), limits=Limits(), timeout=10,
            initiator=True, options=SessionOptions(),
        )
        remote = RemoteWorker(f"memory://worker-{i}")
        remote.attach(session)
        remotes.append(remote)
        daemons.append(daemon)
    config = parse_config({
        "name": "wire", "model": MLP, "rounds": 2, "workers": [f"ws://m{i}:1" for i in range(len(shards))],
        "training": {"epochs": 1, "update": "delta"}, "secure_aggregation": {"clip_norm": 5}, "output": str(out),
    })
    try:
        return await Coordinator(config, workers=remotes).run()
    finally:
        for daemon in daemons:
            await daemon.stop()
        await asyncio.gather(*served, return_exceptions=True)


async def test_nothing_per_worker_reaches_the_coordinator_in_the_clear(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    seen: list[bytes] = []
    history = await _secure_job(digit_shards[0], tmp_path / "run", seen)
    assert [h["workers"] for h in history] == [3, 3]
    limits = Limits()
    messages = [decode_frame(frame, limits) for frame in seen]
    stage_results = [m for m in messages if isinstance(m, StageResult)]
    assert len(stage_results) == 2 * 4 * 3, "four stages, three workers, two rounds"
    assert not any(isinstance(m, TrainResult) for m in messages), "no plain training result ever"
    forbidden = {"num_samples", "samples", "loss", "accuracy", "metrics", "weight", "train_seconds"}

    def keys(value: Any) -> set[str]:
        if isinstance(value, dict):
            return set(value) | set().union(*(keys(v) for v in value.values()))
        if isinstance(value, list):
            return set().union(*(keys(v) for v in value)) if value else set()
        return set()

    for result in stage_results:
        assert not keys(result.payload) & forbidden, result.payload
    announced = [m.state for m in stage_results if m.state is not None]
    assert len(announced) == 2 * 3 and all([t.name for t in h.tensors] == ["masked"] for h in announced)
    assert all(h.tensors[0].dtype == "uint8" for h in announced), "masked vectors travel bit-packed, not as floats"
    data = [m for m in messages if isinstance(m, DataFrame)]
    assert sum(len(d.payload) for d in data) == sum(h.nbytes for h in announced), "no other state moved"


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum", "multi_krum", "fedbuff"])
def test_strategies_that_need_single_updates_are_refused(strategy: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sees only their sum"):
        parse_config({
            "name": "x", "model": MLP, "rounds": 1, "workers": ["ws://a:1"], "strategy": {"name": strategy},
            "secure_aggregation": {"clip_norm": 1}, "output": str(tmp_path),
        })


def test_clip_norm_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secure_aggregation.clip_norm"):
        parse_config({"name": "x", "model": MLP, "rounds": 1, "workers": ["ws://a:1"], "secure_aggregation": {},
                      "output": str(tmp_path)})
