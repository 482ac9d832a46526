"""Fault tolerance with real worker processes: crashes, hangs, cut links, bad results, workers dialling in."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from fedlink.faults import FaultProxy
from fedlink.server.config import JobConfig, parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import LocalWorker, start_worker, start_workers, stop_workers
from fedlink.server.progress import Progress

HERE = Path(__file__).resolve().parent
FAULTY = [sys.executable, str(HERE / "faulty_worker.py")]


def _config(urls: list[str], out: Path, **overrides: Any) -> JobConfig:
    base: dict[str, Any] = {
        "name": "faults",
        "seed": 1,
        "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}},
        "workers": urls,
        "rounds": 6,
        "sampling": {"min_workers": 2},
        "training": {"epochs": 10, "batch_size": 32, "optimizer": {"lr": 0.05, "momentum": 0.9}},
        "timeouts": {"round": 30, "heartbeat": 0.5, "reconnect_max": 0.5, "wait_for_workers": 30, "connect": 5},
        "output": str(out),
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return parse_config(base)


class Hooks(Progress):
    """Calls ``on_training[round]`` when a round dispatches and ``on_finished[round]`` when it ends."""

    def __init__(self) -> None:
        self.on_training: dict[int, Any] = {}
        self.on_finished: dict[int, Any] = {}

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if status == "training" and server_round in self.on_training:
            self.on_training.pop(server_round)()

    def round_finished(self, record: dict[str, Any]) -> None:
        action = self.on_finished.pop(record["round"], None)
        if action is not None:
            action()


async def _run(config: JobConfig, hooks: Progress) -> list[dict[str, Any]]:
    return await asyncio.wait_for(Coordinator(config, progress=hooks).run(), 240)


async def test_worker_killed_mid_round_is_dropped_and_rejoins_after_restart(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    workers = start_workers(digit_shards[0], extra_args=["--threads", "1"])
    hooks = Hooks()
    # SIGKILL worker-2 while round 2 trains; restart it (same port) once round 2 is over. The restart blocks the
    # coordinator's loop for a moment, so the rounds cannot race ahead of it; the pool re-admits it by itself.
    hooks.on_training[2] = workers[2].kill
    hooks.on_finished[2] = workers[2].restart
    try:
        config = _config([w.url for w in workers], tmp_path / "run", rounds=8, timeouts={"heartbeat": 1.0})
        history = await _run(config, hooks)
    finally:
        stop_workers(workers)
    assert history[1]["workers"] == 2 and "worker-2" in history[1]["dropped"], history[1]
    assert history[-1]["workers"] == 3, [h["workers"] for h in history]
    assert len(history) == 8
    assert workers[2].process.returncode == 0, "the restarted worker served and stopped cleanly"


async def test_hanging_worker_misses_the_deadline_then_rejoins(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    workers = start_workers(digit_shards[0], extra_args=["--threads", "1"])
    hooks = Hooks()
    hooks.on_training[2] = lambda: os.kill(workers[1].pid, signal.SIGSTOP)
    hooks.on_finished[2] = lambda: os.kill(workers[1].pid, signal.SIGCONT)
    try:
        config = _config([w.url for w in workers], tmp_path / "run", rounds=6, timeouts={"round": 4})
        history = await _run(config, hooks)
    finally:
        os.kill(workers[1].pid, signal.SIGCONT)
        stop_workers(workers)
    reason = history[1]["dropped"].get("worker-1", "")
    assert history[1]["workers"] == 2 and ("deadline" in reason or "nothing heard" in reason or "closed" in reason), history[1]
    assert history[-1]["workers"] == 3, [h["workers"] for h in history]


async def test_link_cut_mid_transfer_fails_cleanly_and_the_worker_rejoins(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    workers = start_workers(digit_shards[0], extra_args=["--threads", "1"])
    proxy = FaultProxy.for_url(workers[0].url, latency=0.001)
    proxy.start()
    hooks = Hooks()
    # The model below is about 600 kB: cutting after 300 kB lands in the middle of sending it.
    hooks.on_training[2] = lambda: proxy.cut_after(300_000)
    try:
        urls = [proxy.url, workers[1].url, workers[2].url]
        model = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 2048, "num_classes": 10}}
        config = _config(urls, tmp_path / "run", rounds=5, model=model, training={"epochs": 1})
        history = await _run(config, hooks)
    finally:
        proxy.close()
        stop_workers(workers)
    assert proxy.stats.cuts == 1 and proxy.stats.connections >= 2
    assert history[1]["workers"] == 2 and "worker-0" in history[1]["dropped"], history[1]
    assert history[-1]["workers"] == 3
    for worker in workers:
        assert worker.process.returncode == 0, (worker.args, worker.process.returncode, worker.log_tail())


@pytest.mark.parametrize(("mode", "reason"), [("nan", "NaN or infinite"), ("shape", "does not match the model")])
async def test_bad_results_from_a_worker_process_are_refused(digit_shards: tuple[list[Path], Path], tmp_path: Path, mode: str, reason: str) -> None:
    shards = digit_shards[0]
    workers = start_workers(shards[:2], extra_args=["--threads", "1"])
    workers.append(start_worker(shards[2], worker_id="bad", command=[*FAULTY, mode], extra_args=["--threads", "1"]))
    try:
        history = await _run(_config([w.url for w in workers], tmp_path / "run", rounds=2), Progress())
    finally:
        stop_workers(workers)
    for record in history:
        assert record["workers"] == 2 and reason in record["dropped"]["bad"]


async def test_workers_dialling_in_mix_with_dialled_ones(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards = digit_shards[0]
    listening = start_workers(shards[:2], extra_args=["--threads", "1"])
    dialling: list[LocalWorker] = []
    config = _config(
        [w.url for w in listening], tmp_path / "run", rounds=3,
        sampling={"min_workers": 3}, listen={"host": "127.0.0.1", "port": 0},
    )
    coordinator = Coordinator(config)
    run = asyncio.ensure_future(coordinator.run())
    try:
        await asyncio.wait_for(coordinator.listening.wait(), 30)
        assert coordinator.listen_url is not None
        dialling.append(
            await asyncio.to_thread(
                start_worker, shards[2], worker_id="behind-nat", extra_args=["--threads", "1", "--connect", coordinator.listen_url]
            )
        )
        history = await asyncio.wait_for(run, 120)
    finally:
        run.cancel()
        stop_workers(listening + dialling)
    assert [h["workers"] for h in history] == [3, 3, 3]
    for worker in listening + dialling:
        assert worker.process.returncode == 0, (worker.args, worker.process.returncode, worker.log_tail())
