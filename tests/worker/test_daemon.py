"""The worker daemon's request handling over in-memory channels: busy, allow-list, state checks, evaluation."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from fedlink.factory import ModelAllowList
from fedlink.models import mlp
from fedlink.protocol import RemoteError
from fedlink.protocol.messages import (
    EvaluateRequest,
    EvaluateResult,
    Heartbeat,
    Hello,
    ModelSpec,
    TrainingPlan,
    TrainRequest,
    TrainResult,
)
from fedlink.server.inmemory import connect_in_memory
from fedlink.server.remote import RemoteWorker
from fedlink.shards import load_shard
from fedlink.worker.daemon import WorkerDaemon
from fedlink.worker.events import DaemonEvents
from fedlink.worker.service import WorkerService

MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})
HELLO = Hello(role="coordinator", peer_id="test-coordinator")


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(mlp(in_features=64, hidden=16, num_classes=10).state_dict())


class JobStarts(DaemonEvents):
    """Sets ``started`` when the daemon starts a job: by then it holds its job lock (no await in between)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    def job_started(self, kind: str) -> None:
        self.started.set()


async def _worker(shard: Path, events: DaemonEvents | None = None) -> tuple[WorkerDaemon, RemoteWorker, asyncio.Task[None]]:
    daemon = WorkerDaemon(WorkerService(load_shard(shard), allow=ModelAllowList(), worker_id="w0"))
    if events is not None:
        daemon.events = events
    remote, served = await connect_in_memory(daemon, hello=HELLO)
    return daemon, remote, served


async def test_hello_describes_the_shard_without_values(digit_shards: tuple[list[Path], Path]) -> None:
    daemon, remote, served = await _worker(digit_shards[0][0])
    assert remote.hello is not None and remote.hello.dataset is not None
    assert remote.hello.dataset.num_samples == daemon.service.shard.num_samples
    assert remote.hello.dataset.sample_shape == (64,)
    assert remote.name == "w0"
    await remote.close("done")
    await served


async def test_train_round_trip(digit_shards: tuple[list[Path], Path]) -> None:
    _, remote, served = await _worker(digit_shards[0][0])
    assert remote.session is not None
    request = TrainRequest(round=1, task_id="t", model=MLP, plan=TrainingPlan(epochs=1, batch_size=32))
    answer = await remote.session.request(request, state=_state(), timeout=60)
    assert isinstance(answer.message, TrainResult)
    update = await answer.fetch(timeout=30)
    assert update.keys() == _state().keys()
    await remote.close("done")
    await served


async def test_second_job_is_refused_busy_before_its_weights_move(digit_shards: tuple[list[Path], Path]) -> None:
    _, remote, served = await _worker(digit_shards[0][0])
    session = remote.session
    assert session is not None
    slow = TrainRequest(round=1, task_id="slow", model=MLP, plan=TrainingPlan(epochs=40, batch_size=16))
    first = asyncio.ensure_future(session.request(slow, state=_state(), timeout=120))
    # Wait until the worker has pulled the first job's weights: then it is certainly busy, and the byte count
    # below measures the second request alone.
    while session.counters.bytes_out < sum(t.nbytes for t in _state().values()):
        await asyncio.sleep(0.01)
    sent_before = session.counters.bytes_out
    with pytest.raises(RemoteError) as refused:
        await session.request(
            TrainRequest(round=1, task_id="second", model=MLP, plan=TrainingPlan()), state=_state(), timeout=30
        )
    assert refused.value.code == "busy"
    assert session.counters.bytes_out - sent_before < 4096, "a refused job's weights are never transferred"
    # Heartbeats are answered while training runs in its thread.
    await session.send(Heartbeat())
    answer = await first
    assert isinstance(answer.message, TrainResult)
    await remote.close("done")
    await served


async def test_disallowed_model_is_refused_and_not_imported(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sneaky_mod_daemon.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, remote, served = await _worker(digit_shards[0][0])
    assert remote.session is not None
    request = TrainRequest(round=1, task_id="t", model=ModelSpec(factory="sneaky_mod_daemon:model"), plan=TrainingPlan())
    with pytest.raises(RemoteError) as refused:
        await remote.session.request(request, state={"w": torch.zeros(2)}, timeout=30)
    assert refused.value.code == "model_not_allowed"
    assert "sneaky_mod_daemon" not in sys.modules
    await remote.close("done")
    await served


async def test_state_that_does_not_fit_the_model_is_refused_before_transfer(digit_shards: tuple[list[Path], Path]) -> None:
    _, remote, served = await _worker(digit_shards[0][0])
    assert remote.session is not None
    state = _state()
    name = next(iter(state))
    state[name] = torch.zeros(1000, 1000)
    sent_before = remote.session.counters.bytes_out
    with pytest.raises(RemoteError) as refused:
        await remote.session.request(
            TrainRequest(round=1, task_id="t", model=MLP, plan=TrainingPlan()), state=state, timeout=30
        )
    assert refused.value.code == "state_mismatch"
    assert name in refused.value.remote_message
    assert remote.session.counters.bytes_out - sent_before < 64 * 1024
    assert remote.session._outbound == {}, "the refused state is released by the worker's discard"
    await remote.close("done")
    await served


async def test_evaluate(digit_shards: tuple[list[Path], Path]) -> None:
    daemon, remote, served = await _worker(digit_shards[0][0])
    assert remote.session is not None
    answer = await remote.session.request(
        EvaluateRequest(round=0, task_id="e", model=MLP), state=_state(), timeout=30
    )
    assert isinstance(answer.message, EvaluateResult)
    assert answer.message.num_samples == daemon.service.shard.num_samples
    await remote.close("done")
    await served


async def test_stop_ends_a_running_job_and_closes_sessions(digit_shards: tuple[list[Path], Path]) -> None:
    events = JobStarts()
    daemon, remote, served = await _worker(digit_shards[0][0], events)
    assert remote.session is not None
    long_job = TrainRequest(round=1, task_id="long", model=MLP, plan=TrainingPlan(epochs=10_000, batch_size=16))
    pending = asyncio.ensure_future(remote.session.request(long_job, state=_state(), timeout=120))
    await asyncio.wait_for(events.started.wait(), 30)
    await asyncio.wait_for(daemon.stop(), 30)
    with pytest.raises(Exception):
        await pending
    await asyncio.wait_for(served, 10)
    assert remote.session.closed
