"""The round loop over in-memory workers: exact FedAvg, dropped workers, deadlines, bad results."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlink.factory import ModelAllowList
from fedlink.models import mlp
from fedlink.protocol.messages import Hello, ModelSpec, OptimizerSpec, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.tensors import State, header_of
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator, select_workers
from fedlink.server.errors import NotEnoughWorkers
from fedlink.server.inmemory import connect_in_memory
from fedlink.server.remote import RemoteWorker
from fedlink.server.rounds import derive_seed, run_round
from fedlink.server.strategy import FedAvg
from fedlink.shards import load_shard
from fedlink.worker.daemon import WorkerDaemon
from fedlink.worker.service import WorkerService

MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})
PLAN = TrainingPlan(epochs=1, batch_size=32, optimizer=OptimizerSpec(lr=0.1, momentum=0.9))
HELLO = Hello(role="coordinator", peer_id="test")


class NaNService(WorkerService):
    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        result, update = super().train(request, state, stop)
        first = next(iter(update))
        update[first] = update[first].clone()
        update[first][0] = float("nan")
        return result, update


class WrongShapeService(WorkerService):
    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        result, update = super().train(request, state, stop)
        first = next(iter(update))
        update[first] = torch.zeros(3, 3)
        return result, update


class InflatedService(WorkerService):
    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        result, update = super().train(request, state, stop)
        return result.model_copy(update={"num_samples": 10**9}), update


class HangingService(WorkerService):
    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        assert stop is not None
        stop.wait(60)
        return super().train(request, state, stop)


def _global() -> State:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in mlp(in_features=64, hidden=16, num_classes=10).state_dict().items()}


async def _connect(shards: list[Path], kinds: list[type[WorkerService]] | None = None) -> tuple[list[RemoteWorker], list[WorkerDaemon]]:
    kinds = kinds or [WorkerService] * len(shards)
    remotes, daemons = [], []
    for i, (shard, kind) in enumerate(zip(shards, kinds)):
        daemon = WorkerDaemon(kind(load_shard(shard), allow=ModelAllowList(), worker_id=f"worker-{i}"))
        remote, _ = await connect_in_memory(daemon, hello=HELLO)
        remotes.append(remote)
        daemons.append(daemon)
    return remotes, daemons


async def _close(remotes: list[RemoteWorker], daemons: list[WorkerDaemon]) -> None:
    for daemon in daemons:
        await daemon.stop()
    for remote in remotes:
        await remote.close("done")


async def _round(remotes: list[RemoteWorker], *, min_workers: int = 1, timeout: float = 60, update: str = "weights") -> tuple[object, State]:
    state = _global()
    header = header_of(state)
    report = await run_round(
        1,
        remotes,
        global_state=state,
        header=header,
        update_header=header,
        model=MLP,
        plan=PLAN.model_copy(update={"update": update}),
        strategy=FedAvg(),
        seed=5,
        deadline=asyncio.get_running_loop().time() + timeout,
        min_workers=min_workers,
    )
    return report, state


async def test_round_is_exactly_the_sample_weighted_mean(digit_shards: tuple[list[Path], Path]) -> None:
    shards = digit_shards[0]
    remotes, daemons = await _connect(shards)
    try:
        report, start = await _round(remotes)
    finally:
        await _close(remotes, daemons)
    assert [o.status for o in report.outcomes] == ["ok", "ok", "ok"]
    # The same training, done here by hand with the seeds the round derives, folded in the same order.
    total = 0
    acc: dict[str, torch.Tensor] = {}
    for i, shard in enumerate(shards):
        service = WorkerService(load_shard(shard), allow=ModelAllowList(), worker_id=f"worker-{i}")
        request = TrainRequest(round=1, task_id="x", model=MLP, plan=PLAN.model_copy(update={"seed": derive_seed(5, 1, f"worker-{i}")}))
        result, weights = service.train(request, {k: v.clone() for k, v in start.items()})
        n = result.num_samples
        total += n
        for k, v in weights.items():
            acc[k] = v.to(torch.float64 if not v.is_floating_point() else v.dtype) * n if k not in acc else acc[k].add_(v.to(acc[k].dtype), alpha=n)
    for name, value in report.state.items():
        expected = acc[name] / total
        assert torch.equal(value, expected.to(value.dtype)), name


async def test_delta_and_gradient_rounds_move_the_model(digit_shards: tuple[list[Path], Path]) -> None:
    remotes, daemons = await _connect(digit_shards[0])
    try:
        weights, start = await _round(remotes, update="weights")
        delta, _ = await _round(remotes, update="delta")
    finally:
        await _close(remotes, daemons)
    for name in start:
        torch.testing.assert_close(delta.state[name], weights.state[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(NaNService, "NaN or infinite"), (WrongShapeService, "does not match the model"), (InflatedService, "samples but its shard holds")],
)
async def test_bad_results_are_refused_and_the_round_goes_on(
    digit_shards: tuple[list[Path], Path], bad: type[WorkerService], reason: str
) -> None:
    remotes, daemons = await _connect(digit_shards[0], [WorkerService, bad, WorkerService])
    try:
        report, _ = await _round(remotes, min_workers=2)
    finally:
        await _close(remotes, daemons)
    statuses = {o.worker: (o.status, o.reason) for o in report.outcomes}
    assert statuses["worker-0"][0] == statuses["worker-2"][0] == "ok"
    assert statuses["worker-1"][0] == "dropped" and reason in statuses["worker-1"][1]
    assert all(torch.isfinite(t).all() for t in report.state.values() if t.is_floating_point())


async def test_worker_missing_the_deadline_is_dropped(digit_shards: tuple[list[Path], Path]) -> None:
    remotes, daemons = await _connect(digit_shards[0], [WorkerService, WorkerService, HangingService])
    try:
        report, _ = await _round(remotes, min_workers=2, timeout=4)
    finally:
        await _close(remotes, daemons)
    assert [o.status for o in report.outcomes] == ["ok", "ok", "dropped"]
    assert "deadline" in report.outcomes[2].reason


async def test_too_few_answers_stop_the_run_with_reasons(digit_shards: tuple[list[Path], Path]) -> None:
    remotes, daemons = await _connect(digit_shards[0], [WorkerService, NaNService, NaNService])
    try:
        with pytest.raises(NotEnoughWorkers, match="only 1 of 3 workers answered.*worker-1: NaN"):
            await _round(remotes, min_workers=2)
    finally:
        await _close(remotes, daemons)


def test_sampling_is_seeded_and_respects_the_floor() -> None:
    workers = [RemoteWorker(f"ws://w{i}:1") for i in range(10)]
    picks = [select_workers(workers, fraction=0.3, min_workers=2, seed=1, server_round=r) for r in range(1, 6)]
    again = [select_workers(workers, fraction=0.3, min_workers=2, seed=1, server_round=r) for r in range(1, 6)]
    assert [[w.url for w in p] for p in picks] == [[w.url for w in p] for p in again]
    assert all(len(p) == 3 for p in picks)
    assert len({tuple(w.url for w in p) for p in picks}) > 1, "different rounds sample differently"
    assert len(select_workers(workers, fraction=0.05, min_workers=4, seed=1, server_round=1)) == 4
    order = [workers.index(w) for w in picks[0]]
    assert order == sorted(order), "selected workers keep the configured order"


async def _train_job(shards: list[Path], test: Path, out: Path) -> list[dict[str, object]]:
    remotes, daemons = await _connect(shards)
    config = parse_config(
        {
            "name": "memory-job",
            "seed": 3,
            "model": MLP.model_dump(),
            "workers": [f"ws://in-memory-{i}:1" for i in range(len(remotes))],  # the remotes below stand in
            "rounds": 3,
            "training": {"epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.1, "momentum": 0.9}},
            "evaluation": {"data": str(test)},
            "output": str(out),
        }
    )
    try:
        return await Coordinator(config, workers=remotes).run()
    finally:
        await _close(remotes, daemons)


async def test_coordinator_job_writes_metrics_and_model_and_repeats_exactly(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, test = digit_shards
    history = await _train_job(shards, test, tmp_path / "a")
    again = await _train_job(shards, test, tmp_path / "b")
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert all({"round", "accuracy", "loss", "workers", "seconds"} <= line.keys() for line in lines)
    assert lines[-1]["workers"] == 3 and lines[-1]["accuracy"] > 0.9
    assert history[-1]["accuracy"] == lines[-1]["accuracy"]
    first = load_file(tmp_path / "a" / "model.safetensors")
    second = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, same workers: the same model"
    assert again[-1]["accuracy"] == history[-1]["accuracy"]
