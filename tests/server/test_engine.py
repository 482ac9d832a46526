"""The round engine over in-memory workers: FedAvg bytes independent of arrival order, federated evaluation, strategy metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.protocol.messages import Hello
from fedlink.protocol.tensors import State
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.strategy import Aggregation, FedAvg
from fedlink.server.strategy.base import Aggregate, RoundContext
from fedlink.server.strategy.updates import MeanAggregation

from fedlink.server.progress import Progress
from fedlink.shards import load_shard

from .inmemory_jobs import connected, coordinator_for, daemon_for, run_in_memory

HELLO = Hello(role="coordinator", peer_id="test")
MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}}

async def _job(shards: list[Path], out: Path, config: dict[str, Any]) -> Coordinator:
    return await run_in_memory(shards, {"name": "engine", "seed": 3, "model": MLP, "rounds": 3, "output": str(out), **config})


def _digest(state: State) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


class ArrivalOrder(Progress):
    """The order in which workers' updates started to upload, per round."""

    def __init__(self) -> None:
        self.order: dict[int, list[str]] = {}

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if status == "uploading":
            self.order.setdefault(server_round, []).append(worker)


async def _job_with_slow_worker(shards: list[Path], out: Path, config: dict[str, Any], slow: int) -> tuple[str, ArrivalOrder]:
    """The job of :func:`_job`, with worker ``slow`` taking 40 times as long, so that its update arrives last."""
    daemons = [daemon_for(shard, i, slowdown=40.0 if i == slow else 1.0) for i, shard in enumerate(shards)]
    arrivals = ArrivalOrder()
    async with connected(daemons) as remotes:
        job = {"name": "engine", "seed": 3, "model": MLP, "rounds": 3, "output": str(out), **config}
        coordinator = coordinator_for(remotes, job, arrivals)
        await coordinator.run()
    return _digest(coordinator.state), arrivals


@pytest.mark.parametrize(
    "config",
    [
        {"training": {"epochs": 1, "batch_size": 32, "optimizer": {"lr": 0.1, "momentum": 0.9}}},
        {
            "training": {
                "epochs": 1, "batch_size": 32, "optimizer": {"lr": 0.1, "momentum": 0.9}, "update": "delta",
                "grad_clip": 1.0,
            },
            "strategy": {"name": "fedprox", "mu": 0.1},
        },
    ],
)
async def test_the_order_updates_arrive_in_does_not_change_a_bit_of_the_model(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, config: dict[str, Any]
) -> None:
    """Results are taken as they arrive but folded in worker order: FedAvg's bytes are those of a fixed order.

    (These bytes were once pinned as digests computed by the round loop that came before the engine; float
    kernels differ between CPUs, so the digests held only on the machine that computed them.)"""
    first, early = await _job_with_slow_worker(digit_shards[0], tmp_path / "a", config, slow=0)
    last, late = await _job_with_slow_worker(digit_shards[0], tmp_path / "b", config, slow=2)
    assert all(order[-1] == "worker-0" for order in early.order.values()), early.order
    assert all(order[-1] == "worker-2" for order in late.order.values()), late.order
    assert first == last


async def test_federated_accuracy_is_the_sample_weighted_mean_of_the_workers(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    shards, test = digit_shards
    await _job(shards, tmp_path / "run", {
        "rounds": 2,
        "training": {"epochs": 1, "optimizer": {"lr": 0.1, "momentum": 0.9}},
        "evaluation": {"data": str(test), "federated": {"every": 1, "fraction": 1.0}},
    })
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    workers = [json.loads(line) for line in (tmp_path / "run" / "workers.jsonl").read_text().splitlines()]
    for record in records:
        evaluated = [w for w in workers if w["round"] == record["round"] and w["stage"] == "evaluate"]
        assert [w["worker"] for w in evaluated] == ["worker-0", "worker-1", "worker-2"]
        assert all(w["status"] == "ok" and w["samples"] > 0 for w in evaluated)
        total = sum(w["samples"] for w in evaluated)
        expected = sum(w["metrics"]["accuracy"] * w["samples"] for w in evaluated) / total
        assert record["federated_accuracy"] == pytest.approx(expected, rel=1e-12)
        expected_loss = sum(w["metrics"]["loss"] * w["samples"] for w in evaluated) / total
        assert record["federated_loss"] == pytest.approx(expected_loss, rel=1e-12)
        assert record["federated_samples"] == sum(load_shard(s).num_samples for s in shards)
    assert records[-1]["federated_accuracy"] > 0.6
    trained = [w for w in workers if w["stage"] == "train"]
    assert len(trained) == 6 and {"round", "worker", "stage", "status", "reason", "samples", "seconds", "metrics"} <= trained[0].keys()


class NoisyMean(FedAvg):
    """Adds seeded noise to the mean and reports its norm: uses the round context, returns metrics."""

    name = "noisy_mean"

    def start_round(self, context: RoundContext, global_state: State) -> Aggregation:
        def finish(kind: Any, global_state: State, mean: State) -> Aggregate:
            noise = {k: torch.randn(v.shape, generator=context.generator) * 1e-3 for k, v in mean.items() if v.is_floating_point()}
            state = {k: v + noise[k] if k in noise else v for k, v in mean.items()}
            norm = float(torch.sqrt(sum((n**2).sum() for n in noise.values())))
            return Aggregate(state, {"noise_norm": norm, "round_seen": float(context.server_round)})

        return MeanAggregation(global_state, finish)  # type: ignore[arg-type]


async def test_strategy_metrics_land_in_metrics_jsonl_and_its_generator_is_seeded(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    module = types.ModuleType("noisy_strategies")
    module.NoisyMean = NoisyMean  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "noisy_strategies", module)
    config = {"rounds": 2, "strategy": {"name": "noisy_strategies:NoisyMean"}, "training": {"epochs": 1}}
    first = await _job(digit_shards[0], tmp_path / "a", config)
    second = await _job(digit_shards[0], tmp_path / "b", config)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round_seen"] for r in records] == [1.0, 2.0]
    assert all(r["noise_norm"] > 0 for r in records)
    assert _digest(first.state) == _digest(second.state), "the strategy's noise repeats with the seed"
    assert records[0]["noise_norm"] != records[1]["noise_norm"], "each round draws its own noise"


def test_run_id_is_stable_for_a_job_and_differs_between_jobs(tmp_path: Path) -> None:
    base = {"name": "a", "model": MLP, "rounds": 1, "workers": ["ws://x:1"], "output": str(tmp_path)}
    one = Coordinator(parse_config(base), workers=[])
    again = Coordinator(parse_config(base), workers=[])
    other = Coordinator(parse_config({**base, "seed": 9}), workers=[])
    assert one.run_id == again.run_id != other.run_id
