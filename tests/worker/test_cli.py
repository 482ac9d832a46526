"""``fl-worker`` as a real process: refusing bad shards at start, surviving garbage, exiting cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import pickle
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from fedlink.errors import FedlinkError
from fedlink.models import mlp
from fedlink.protocol import Channel, Limits, handshake
from fedlink.protocol.messages import Hello, ModelSpec, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.session import Session
from fedlink.protocol.transport import dial
from fedlink.server.localworkers import start_worker, worker_command

MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})


def _refused(path: Path) -> str:
    done = subprocess.run([*worker_command(), "--data", str(path), "--port", "0"], capture_output=True, timeout=60)
    assert done.returncode != 0
    assert done.stdout == b"", "a refused worker never announces that it listens"
    return done.stderr.decode()


def test_pickled_shard_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npy"
    path.write_bytes(pickle.dumps({"x": [1, 2], "y": [0, 1]}))
    message = _refused(path)
    assert str(path) in message and "not a numpy" in message


def test_object_array_shard_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    message = _refused(path)
    assert str(path) in message


def test_corrupt_and_wrong_format_shards_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.npy"
    records = np.zeros(4, dtype=[("x", np.float32, (3,)), ("y", np.int64)])
    np.save(good, records)
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:-10])
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((4, 3), dtype=np.float32))
    text = tmp_path / "text.csv"
    text.write_text("x,y\n1,2\n")
    for path in (truncated, plain, text, tmp_path / "missing.npy"):
        assert str(path) in _refused(path)


async def _coordinator_session(url: str) -> tuple[Session, Channel]:
    limits = Limits()
    channel = await dial(url, limits=limits, timeout=10)
    peer = await handshake(channel, Hello(role="coordinator", peer_id="c"), limits=limits, timeout=10)
    session = Session(channel, peer=peer, limits=limits)
    session.start()
    return session, channel


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(mlp(in_features=64, hidden=16, num_classes=10).state_dict())


def test_serves_after_garbage_frames_and_exits_0_on_sigterm(digit_shards: tuple[list[Path], Path]) -> None:
    worker = start_worker(digit_shards[0][0], worker_id="w0")
    try:
        asyncio.run(_garbage_then_train(worker.url))
        assert worker.process.poll() is None, "the worker is still up"
    finally:
        status = worker.stop()
    assert status == 0
    log = worker.log_path.read_text()
    assert "bad frame" in log and "Traceback" not in log


async def _garbage_then_train(url: str) -> None:
    async with connect(url, subprotocols=["fedlink.v1"]) as raw:  # type: ignore[list-item]
        for junk in (b"", b"\x01\xff\xfe", b"\x02" + b"\x00" * 20, b"\x07junk", "text frame"):
            await raw.send(junk)
        # Whatever the worker answers, it must not be a crash: it sends an error or closes this peer.
        reply = await asyncio.wait_for(raw.recv(), 10)
        assert reply
    session, channel = await _coordinator_session(url)
    state = _state()
    for junk in (b"\x01\x93\x01\x02\x03", b"\x09"):
        await channel.send(junk)
    answer = await session.request(TrainRequest(round=1, task_id="t", model=MLP, plan=TrainingPlan()), state=state, timeout=60)
    assert isinstance(answer.message, TrainResult)
    assert (await answer.fetch(timeout=30)).keys() == state.keys()
    await session.close("done")


def test_sigterm_during_training_exits_0_promptly(digit_shards: tuple[list[Path], Path]) -> None:
    worker = start_worker(digit_shards[0][0], worker_id="w0")
    try:
        asyncio.run(_start_long_job_then_terminate(worker.url, worker.process))
        assert worker.process.wait(30) == 0
    finally:
        worker.kill()
    assert "shutting down" in worker.log_path.read_text()


async def _start_long_job_then_terminate(url: str, process: subprocess.Popen[bytes]) -> None:
    session, channel = await _coordinator_session(url)
    state = _state()
    job = TrainRequest(round=1, task_id="t", model=MLP, plan=TrainingPlan(epochs=10_000, batch_size=16))
    pending = asyncio.ensure_future(session.request(job, state=state, timeout=120))
    # Once the weights have left, the worker is training.
    while session.counters.bytes_out < sum(t.nbytes for t in state.values()):
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    with pytest.raises(FedlinkError):
        await pending
    await session.close("done")
