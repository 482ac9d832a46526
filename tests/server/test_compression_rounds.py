"""Compressed uploads and a cast-down download through the coordinator's real round path, over in-memory workers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.compression import CompressionSpec, wire_header
from fedlink.protocol.capabilities import TRANSFER
from fedlink.protocol.messages import Hello
from fedlink.protocol.tensors import header_of
from fedlink.server.config import parse_config
from fedlink.server.coordinator import initial_state
from fedlink.server.progress import Progress
from fedlink.server.errors import ConfigError
from fedlink.factory import ModelAllowList
from fedlink.models import mlp, sized_mlp
from fedlink.shards import load_shard
from fedlink.worker.daemon import WorkerDaemon
from fedlink.worker.service import WorkerService

from .inmemory_jobs import connected, coordinator_for, daemon_for, in_memory_workers

MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}}
DENSE = header_of(mlp(**MLP["kwargs"]).state_dict())  # type: ignore[arg-type]


def _config(out: Path, training: dict[str, Any], test: Path, rounds: int = 4) -> dict[str, Any]:
    return {
        "name": "compression", "seed": 3, "model": MLP, "rounds": rounds, "output": str(out),
        "training": {"update": "delta", "epochs": 5, "optimizer": {"lr": 0.05, "momentum": 0.9}, **training},
        "evaluation": {"data": str(test)},
    }


def _records(out: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


async def _job(shards: list[Path], config: dict[str, Any]) -> list[dict[str, Any]]:
    async with in_memory_workers(shards) as remotes:
        return await coordinator_for(remotes, config).run()


@pytest.mark.parametrize(
    ("compression", "accuracy"),
    [({"name": "none"}, 0.9), ({"name": "float16"}, 0.9), ({"name": "bfloat16"}, 0.9), ({"name": "int8"}, 0.9),
     ({"name": "topk", "ratio": 0.05}, 0.6), ({"name": "topk", "ratio": 0.05, "dense_below": 0}, 0.6)],
)
async def test_each_scheme_learns_and_uploads_exactly_its_wire_size(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, compression: dict[str, Any], accuracy: float
) -> None:
    shards, test = digit_shards
    config = _config(tmp_path / "run", {"compression": compression}, test)
    history = await _job(shards, config)
    dense = DENSE
    per_worker = wire_header(dense, CompressionSpec(**compression)).nbytes
    for record in history:
        assert record["workers"] == 3 and record["upload_bytes"] == 3 * per_worker
        assert record["download_bytes"] == 3 * dense.nbytes
    assert history[-1]["accuracy"] >= accuracy, history[-1]
    workers = _records(tmp_path / "run", "workers.jsonl")
    assert {w["upload_bytes"] for w in workers} == {per_worker}


async def test_float16_download_halves_what_is_sent_and_still_learns(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    shards, test = digit_shards
    history = await _job(shards, _config(tmp_path / "run", {"download": "float16", "compression": {"name": "int8"}}, test))
    full = await _job(shards, _config(tmp_path / "plain", {}, test))
    assert history[0]["download_bytes"] * 2 == full[0]["download_bytes"]
    assert history[-1]["accuracy"] >= full[-1]["accuracy"] - 0.05, (history[-1], full[-1])


class OlderDaemon(WorkerDaemon):
    """A worker of an earlier fedlink: its hello offers neither compression nor a cast-down download."""

    def hello(self) -> Hello:
        hello = super().hello()
        return hello.model_copy(update={"capabilities": tuple(c for c in hello.capabilities if c not in TRANSFER)})


async def test_a_worker_without_the_capability_trains_uncompressed_and_is_named_once(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards, test = digit_shards
    new = WorkerDaemon(WorkerService(load_shard(shards[0]), allow=ModelAllowList(), worker_id="new"))
    old = OlderDaemon(WorkerService(load_shard(shards[1]), allow=ModelAllowList(), worker_id="old"))
    config = _config(tmp_path / "run", {"compression": {"name": "topk", "ratio": 0.01}, "download": "float16"}, test, 3)
    config["sampling"] = {"min_workers": 2}
    async with connected([new, old]) as remotes:
        with caplog.at_level(logging.WARNING, logger="fedlink.server"):
            await coordinator_for(remotes, config).run()
    dense = DENSE
    sent = {(w["worker"], w["upload_bytes"], w["download_bytes"]) for w in _records(tmp_path / "run", "workers.jsonl")}
    topk = wire_header(dense, CompressionSpec(name="topk", ratio=0.01)).nbytes
    assert sent == {("new", topk, dense.nbytes // 2), ("old", dense.nbytes, dense.nbytes)}
    warnings = [r.getMessage() for r in caplog.records if "does not offer" in r.getMessage()]
    assert warnings == [
        "worker 'old' does not offer compress/topk (an older fedlink?): it trains and uploads without it",
        "worker 'old' does not offer download/float16 (an older fedlink?): it trains and uploads without it",
    ]


@pytest.mark.parametrize(
    ("training", "extra", "problem"),
    [
        ({"update": "weights", "compression": {"name": "int8"}}, {}, "int8 quantises or drops values.*training.update delta"),
        ({"update": "weights", "compression": {"name": "topk"}}, {}, "topk quantises"),
        ({"update": "delta", "compression": {"name": "zip"}}, {}, "compression.name"),
        ({"update": "delta", "compression": {"name": "topk", "ratio": 0}}, {}, "ratio"),
        ({"update": "delta", "compression": {"name": "int8"}}, {"secure_aggregation": {"clip_norm": 1.0}},
         "training.compression does not apply under secure_aggregation"),
        ({"update": "delta", "download": "float16"}, {"secure_aggregation": {"clip_norm": 1.0}}, "training.download"),
    ],
)
def test_compression_settings_that_cannot_work_are_refused_by_key(
    training: dict[str, Any], extra: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config({"name": "x", "rounds": 1, "model": MLP, "workers": ["ws://x:1"], "training": training, **extra})


def test_defaults_keep_the_fingerprint_of_runs_from_before_compression_existed() -> None:
    base = {"name": "x", "rounds": 1, "model": MLP, "workers": ["ws://x:1"]}
    plain = parse_config(base).fingerprint()
    assert parse_config({**base, "training": {"compression": {"name": "none"}, "download": "float32"}}).fingerprint() == plain
    assert parse_config({**base, "training": {"update": "delta", "compression": {"name": "int8"}}}).fingerprint() != (
        parse_config({**base, "training": {"update": "delta"}}).fingerprint()
    )


async def test_fedbuff_takes_compressed_updates_too(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, test = digit_shards
    config = _config(tmp_path / "run", {"compression": {"name": "int8"}, "download": "bfloat16"}, test, rounds=3)
    config["strategy"] = {"name": "fedbuff", "buffer_size": 2}
    history = await _job(shards, config)
    int8 = wire_header(DENSE, CompressionSpec(name="int8")).nbytes
    assert len(history) == 3
    workers = _records(tmp_path / "run", "workers.jsonl")
    taken = [w for w in workers if w["status"] == "ok"]
    assert taken and {w["upload_bytes"] for w in taken} == {int8}
    assert {w["download_bytes"] for w in taken} == {DENSE.nbytes // 2}
    assert history[-1]["accuracy"] > 0.5


FROZEN = {"factory": "fedlink.models:sized_mlp",
          "kwargs": {"megabytes": 0.25, "in_features": 64, "num_classes": 10, "frozen_backbone": True}}


@pytest.mark.parametrize("update", ["weights", "delta"])
async def test_frozen_parameters_never_travel_back_and_the_model_is_the_same_to_the_bit(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, update: str
) -> None:
    """A frozen backbone's update is known without asking (unchanged weights, zero deltas): the head alone travels,
    and the run ends with the head of one where every tensor travelled and the backbone it started with."""
    shards, test = digit_shards
    results = {}
    for upload in ("trainable", "all"):
        config = {**_config(tmp_path / upload, {"update": update, "upload": upload}, test, rounds=2), "model": FROZEN}
        async with in_memory_workers(shards) as remotes:
            coordinator = coordinator_for(remotes, config)
            history = await coordinator.run()
        results[upload] = (coordinator.state, history)
    trimmed, full = results["trainable"], results["all"]
    model = sized_mlp(**FROZEN["kwargs"])  # type: ignore[arg-type]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    initial, _ = initial_state(parse_config({**config, "workers": ["ws://x:1"], "sampling": {"min_workers": 1}}))
    # The backbone is left out of the fold and kept as it was, to the bit. Folded (upload: all), zero deltas keep it
    # too, so the whole model is the same; a float32 mean of equal weights may round it, and the head then follows.
    assert all(torch.equal(trimmed[0][k], initial[k]) for k in frozen)
    if update == "delta":
        assert all(torch.equal(trimmed[0][k], full[0][k]) for k in full[0])
    else:
        assert all(torch.allclose(trimmed[0][k], full[0][k], rtol=0, atol=1e-5) for k in full[0])
    head = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert all(r["upload_bytes"] == 3 * head for r in trimmed[1])
    assert all(r["upload_bytes"] == 3 * header_of(model.state_dict()).nbytes for r in full[1])
    assert not torch.equal(trimmed[0]["7.weight"], initial["7.weight"])  # the head trained


class _Forget(Progress):
    """Makes ``daemon`` lose its kept global state once its update of round ``after`` is uploading, when it has
    kept that round's state and before the next round is sent (as a restart would)."""

    def __init__(self, daemon: WorkerDaemon, after: int) -> None:
        self.daemon, self.after = daemon, after

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if server_round == self.after and worker == self.daemon.service.worker_id and status == "uploading":
            self.daemon.service.memory.global_state = None


async def test_only_changed_tensors_travel_down_and_a_lost_cache_costs_one_round(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    """A frozen backbone goes to each worker once; after that only the head does. A worker that lost what it kept
    says so, is dropped from that round alone, and is sent everything in the next."""
    shards, test = digit_shards
    model = sized_mlp(**FROZEN["kwargs"])  # type: ignore[arg-type]
    full = header_of(model.state_dict()).nbytes
    head = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    states = {}
    for changed_only in (True, False):
        config = {**_config(tmp_path / str(changed_only), {"update": "delta", "send_only_changed": changed_only}, test,
                            rounds=4), "model": FROZEN}
        daemons = [daemon_for(shard, i) for i, shard in enumerate(shards)]
        async with connected(daemons) as remotes:
            progress = _Forget(daemons[1], after=2) if changed_only else Progress()
            coordinator = coordinator_for(remotes, config, progress)
            await coordinator.run()
        states[changed_only] = coordinator.state
    sent = {(w["round"], w["worker"]): (w["status"], w.get("download_bytes")) for w in
            _records(tmp_path / "True", "workers.jsonl")}
    assert [sent[(1, f"worker-{i}")] for i in range(3)] == [("ok", full)] * 3
    assert [sent[(2, f"worker-{i}")] for i in range(3)] == [("ok", head)] * 3
    assert sent[(3, "worker-0")] == sent[(3, "worker-2")] == ("ok", head)
    assert sent[(3, "worker-1")][0] == "dropped"
    reason = _records(tmp_path / "True", "metrics.jsonl")[2]["dropped"]["worker-1"]
    assert "keep global state" in reason and "the next request must send the whole state" in reason
    assert sent[(4, "worker-1")] == ("ok", full)
    assert [r["download_bytes"] for r in _records(tmp_path / "False", "metrics.jsonl")] == [3 * full] * 4
    # The worker that missed round 3 changes the fold, so compare only what both runs share: the frozen backbone.
    assert torch.equal(states[True]["1.weight"], states[False]["1.weight"])


async def test_scaffold_leaves_a_frozen_backbone_alone(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    """SCAFFOLD's correction is added to every gradient; a frozen parameter has none and must stay frozen (given a
    gradient, even a zero one, weight decay would shrink it)."""
    shards, test = digit_shards
    # upload: all, so that the coordinator sees what the worker did to the backbone rather than filling it in
    training = {"update": "delta", "upload": "all", "optimizer": {"lr": 0.05, "weight_decay": 0.01}}
    config = {**_config(tmp_path / "run", training, test, rounds=2),
              "model": FROZEN, "strategy": {"name": "scaffold"}}
    async with in_memory_workers(shards) as remotes:
        coordinator = coordinator_for(remotes, config)
        await coordinator.run()
    initial, _ = initial_state(parse_config({**config, "workers": ["ws://x:1"], "sampling": {"min_workers": 1}}))
    assert torch.equal(coordinator.state["1.weight"], initial["1.weight"])
    assert not torch.equal(coordinator.state["7.weight"], initial["7.weight"])
