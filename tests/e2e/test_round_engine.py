"""The round engine with real worker processes: per-worker deadlines, plugin stages, one identity per worker."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from fedlink.faults import FaultProxy
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.errors import NotEnoughWorkers
from fedlink.server.localworkers import start_worker, start_workers, stop_workers

CNN = {"factory": "fedlink.models:mnist_cnn", "kwargs": {}}


def _mnist_config(urls: list[str], out: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "engine",
        "seed": 4,
        "model": CNN,
        "workers": urls,
        "rounds": 2,
        "sampling": {"min_workers": 2},
        # A few steps: honest workers answer within a second or two, far inside the deadline.
        "training": {"epochs": 1, "batch_size": 32, "max_steps": 10, "optimizer": {"lr": 0.05, "momentum": 0.9}},
        "timeouts": {"round": 8, "heartbeat": 1.0, "connect": 5, "round_retries": 0, "reconnect_max": 1.0},
        "output": str(out),
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    ("fault", "label"),
    [({"bandwidth": 60_000}, "slow link"), ({"upload_bandwidth": 40_000}, "dripping upload")],
)
def test_a_worker_that_cannot_meet_the_deadline_is_dropped_alone(
    mnist3: Path, tmp_path: Path, fault: dict[str, float], label: str
) -> None:
    """Listed first, slow: before, the honest workers 'missed the deadline' behind it and the round failed."""
    workers = start_workers([mnist3 / f"shard-{i}.npy" for i in range(3)], extra_args=["--threads", "1"])
    proxy = FaultProxy.for_url(workers[0].url, **fault)
    proxy.start()
    try:
        urls = [proxy.url, workers[1].url, workers[2].url]
        config = parse_config(_mnist_config(urls, tmp_path / "run"))
        history = asyncio.run(asyncio.wait_for(Coordinator(config).run(), 240))
    finally:
        proxy.close()
        stop_workers(workers)
    assert "deadline" in history[0]["dropped"]["worker-0"], history[0]
    assert list(history[0]["dropped"]) == ["worker-0"], (label, history[0])
    # Later rounds may find it still busy with the round it missed (dropped alone again), or its connection lost:
    # a link that slow can go quiet for longer than the heartbeat allows, and whether that happens just before or
    # just after the next round picks its workers is a matter of milliseconds. Either way the others are not harmed.
    for record in history:
        assert record["workers"] == 2, (label, record)
        assert set(record["dropped"]) <= {"worker-0"}, (label, record)


PLUGIN = '''
"""A lab's own three-stage round: announce, train, confirm (the context of stage 1 must survive to stage 3)."""
from pydantic import BaseModel

from fedlink.server.plugin_stage import PluginStage
from fedlink.server.strategy.base import as_aggregate
from fedlink.server.strategy.fedavg import FedAvg
from fedlink.worker.stages import StageHandler


class Announce(StageHandler):
    class Request(StageHandler.Request):
        salt: int

    class Result(StageHandler.Result):
        token: int

    def handle(self, context, request, state):
        token = (request.salt * 7919 + len(context.y)) % 1000003
        context.round_state["token"] = token
        return self.Result(token=token), None


class Confirm(StageHandler):
    class Result(StageHandler.Result):
        token: int | None

    def handle(self, context, request, state):
        return self.Result(token=context.round_state.get("token")), None


class ThreeStages(FedAvg):
    name = "three_stages"

    async def run_round(self, driver):
        def stage(name, handler, result, payload):
            return PluginStage(name, handler=handler, result_model=result, payload=payload, run_id=driver.run_id,
                               timeout=driver.timeout, min_survivors=driver.min_workers)

        first = await driver.run(stage("announce", "my_lab_stages:Announce", Announce.Result, {"salt": driver.server_round}))
        aggregation = self.start_round(driver.context, driver.global_state)
        await driver.run(driver.train_stage(aggregation))
        last = await driver.run(stage("confirm", "my_lab_stages:Confirm", Confirm.Result, {}))
        confirmed = sum(1 for w, a in last.results.items() if a.result.token == first.results[w].result.token)
        result = as_aggregate(aggregation.finish())
        result.metrics["confirmed"] = float(confirmed)
        return result
'''


def _plugin_job(digit_shards: tuple[list[Path], Path], tmp_path: Path, extra: list[str]) -> list[dict[str, Any]]:
    shards, test = digit_shards
    workers = start_workers(shards, extra_args=["--threads", "1", *extra], env={"PYTHONPATH": str(tmp_path)})
    try:
        config = parse_config({
            "name": "three-stages",
            "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}},
            "workers": [w.url for w in workers],
            "rounds": 3,
            "sampling": {"min_workers": 3},
            "training": {"epochs": 1, "optimizer": {"lr": 0.1, "momentum": 0.9}},
            "strategy": {"name": "my_lab_stages:ThreeStages"},
            "evaluation": {"data": str(test)},
            "timeouts": {"round": 60, "round_retries": 0},
            "output": str(tmp_path / "run"),
        })
        return asyncio.run(asyncio.wait_for(Coordinator(config).run(), 240))
    finally:
        stop_workers(workers)


def test_a_three_stage_strategy_runs_with_allowed_plugin_handlers(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_lab_stages.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    history = _plugin_job(digit_shards, tmp_path, ["--allow-plugin", "my_lab_stages:*"])
    assert [h["confirmed"] for h in history] == [3.0, 3.0, 3.0], "stage 3 saw what stage 1 kept, on every worker"
    assert history[-1]["accuracy"] > 0.8
    stages = [line for line in (tmp_path / "run" / "workers.jsonl").read_text().splitlines()]
    assert len(stages) == 3 * 3 * 3, "one line per worker per stage per round"


def test_a_worker_refuses_a_plugin_its_operator_did_not_allow(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_lab_stages.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(NotEnoughWorkers, match="--allow-plugin"):
        _plugin_job(digit_shards, tmp_path, [])


def test_a_second_worker_claiming_a_live_id_is_refused_on_both_sides(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards, _ = digit_shards
    first = start_worker(shards[0], worker_id="twin", extra_args=["--threads", "1"])
    second = start_worker(shards[1], worker_id="twin", extra_args=["--threads", "1"])
    try:
        config = parse_config({
            "name": "twins",
            "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}},
            "workers": [first.url, second.url],
            "rounds": 1,
            "timeouts": {"reconnect_max": 1.0},
            "output": str(tmp_path / "run"),
        })
        with caplog.at_level(logging.WARNING, logger="fedlink.server"):
            history = asyncio.run(asyncio.wait_for(Coordinator(config).run(), 120))
    finally:
        stop_workers([first, second])
    assert history[0]["workers"] == 1 and history[0]["selected"] == 1
    assert "worker id 'twin' is already connected" in caplog.text
    assert "duplicate_worker" in second.log_path.read_text() + first.log_path.read_text(), "the refused worker is told"
