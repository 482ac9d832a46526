"""The simulation host: requests routed to virtual workers, per-virtual-worker memory, refusals before any work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedlink.protocol.channel import memory_pair
from fedlink.protocol.connect import open_session
from fedlink.protocol.errors import RemoteError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello, HookSpec, ModelSpec, OptimizerSpec, RoundEnd, TrainingPlan, TrainRequest
from fedlink.protocol.session import Session
from fedlink.protocol.tensors import header_of
from fedlink.shards import save_shard
from fedlink.worker.virtual_host import HostSpec, VirtualHost, keyring_for, load_partition, save_partition, virtual_id

TOKEN = "Vq3-tN8xZ_pL2mR7wK9cY4bH6jD1fG5sA0eU"
MODEL = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 4, "hidden": 8, "num_classes": 3})


def make_host(tmp_path: Path, workers: int, samples: int = 200) -> VirtualHost:
    rng = np.random.default_rng(0)
    save_shard(tmp_path / "data.npy", rng.normal(size=(samples, 4)).astype(np.float32), rng.integers(0, 3, samples))
    parts = np.array_split(np.arange(samples, dtype=np.int64), workers)
    save_partition(tmp_path / "partition.npz", parts)
    spec = HostSpec(index=0, data=str(tmp_path / "data.npy"), partition=str(tmp_path / "partition.npz"))
    return VirtualHost(spec, keyring=keyring_for(TOKEN))


async def connect(host: VirtualHost) -> Session:
    coordinator_end, host_end = memory_pair("coordinator", "host")
    asyncio.ensure_future(host.serve_channel(host_end))
    return await open_session(
        coordinator_end, Hello(role="coordinator", peer_id="test"), limits=Limits(), timeout=10,
        keyring=keyring_for(TOKEN), initiator=True,
    )


def request(worker: str | None, *, server_round: int = 1, hooks: tuple[HookSpec, ...] = ()) -> TrainRequest:
    plan = TrainingPlan(epochs=1, batch_size=8, optimizer=OptimizerSpec(name="sgd", lr=0.1), update="delta", seed=7)
    for hook in hooks:
        plan = plan.with_hook(hook)
    return TrainRequest(round=server_round, task_id=f"t-{worker}", model=MODEL, plan=plan, run="run-1", worker=worker)


def initial_state() -> dict[str, object]:
    import torch

    from fedlink.models import mlp

    torch.manual_seed(0)
    return dict(mlp(in_features=4, hidden=8, num_classes=3).state_dict())


def test_partition_round_trips_without_pickle(tmp_path: Path) -> None:
    parts = [np.array([3, 1], dtype=np.int64), np.array([0], dtype=np.int64), np.array([2, 4, 5], dtype=np.int64)]
    offsets, indices = load_partition(save_partition(tmp_path / "p.npz", parts))
    assert offsets.tolist() == [0, 2, 3, 6]
    assert indices.tolist() == [3, 1, 0, 2, 4, 5]


async def test_requests_train_the_named_virtual_worker_on_its_own_shard(tmp_path: Path) -> None:
    host = make_host(tmp_path, workers=10)
    session = await connect(host)
    state = initial_state()
    answers = {}
    for worker in (virtual_id(3), virtual_id(7)):
        inbound = await session.request(request(worker), state=state, timeout=60)
        answers[worker] = inbound.message
        update = await inbound.fetch()
        assert set(update) == set(state)
    assert answers[virtual_id(3)].num_samples == 20 and answers[virtual_id(7)].num_samples == 20
    # Only the virtual workers that were asked have memory here: nothing grows with the others.
    assert host.remembered == 2 and host.workers == 10
    await session.close()
    await host.stop()


async def test_a_request_without_or_with_an_unknown_virtual_worker_is_refused_before_its_state_moves(tmp_path: Path) -> None:
    host = make_host(tmp_path, workers=4)
    session = await connect(host)
    state = initial_state()
    for worker in (None, "sim-4", "worker-1", "sim-x"):
        with pytest.raises(RemoteError, match="bad_request|virtual worker"):
            await session.request(request(worker), state=state, timeout=30)
    assert session.counters.bytes_out < 4096, "the refused requests' states were never pulled"
    assert host.remembered == 0
    await session.close()
    await host.stop()


async def test_each_virtual_worker_keeps_its_own_run_store_across_rounds(tmp_path: Path) -> None:
    """What a technique carries between rounds lives in the run store: one per virtual worker, kept by the host."""
    host = make_host(tmp_path, workers=4)
    session = await connect(host)
    state = initial_state()
    inbound = await session.request(request("sim-0"), state=state, timeout=60)
    await inbound.fetch(expected=header_of(state))
    await session.send(RoundEnd(round=1, run="run-1", worker="sim-0"))
    store = host.service("sim-0").memory.run("run-1")
    store.data["residual"] = 1.5  # as error feedback would leave it
    inbound = await session.request(request("sim-0", server_round=2), state=state, timeout=60)
    await inbound.fetch(expected=header_of(state))
    again = host.service("sim-0").memory.run("run-1")
    assert again is store and not again.fresh and again.data == {"residual": 1.5}
    assert host.service("sim-1").memory.run("run-1").fresh, "another virtual worker starts with its own empty store"
    await session.close()
    await host.stop()
