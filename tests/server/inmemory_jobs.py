"""Whole jobs over in-memory workers: the real daemon, session, engine and coordinator, joined without sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fedlink.factory import ModelAllowList
from fedlink.protocol.messages import Hello
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.inmemory import connect_in_memory
from fedlink.server.progress import Progress
from fedlink.server.remote import RemoteWorker
from fedlink.shards import load_shard
from fedlink.worker.daemon import WorkerDaemon
from fedlink.worker.service import WorkerService

HELLO = Hello(role="coordinator", peer_id="test")


def daemon_for(shard: Path, index: int, *, slowdown: float = 1.0) -> WorkerDaemon:
    """A worker daemon over ``shard`` with id ``worker-<index>``."""
    return WorkerDaemon(
        WorkerService(load_shard(shard), allow=ModelAllowList(), worker_id=f"worker-{index}", slowdown=slowdown)
    )


@asynccontextmanager
async def connected(daemons: list[WorkerDaemon]) -> AsyncIterator[list[RemoteWorker]]:
    """Each daemon joined to a RemoteWorker; the daemons and their sessions are always stopped."""
    remotes: list[RemoteWorker] = []
    try:
        for daemon in daemons:
            remotes.append((await connect_in_memory(daemon, hello=HELLO))[0])
        yield remotes
    finally:
        for daemon in daemons:
            await daemon.stop()
        for remote in remotes:
            await remote.close("done")


@asynccontextmanager
async def in_memory_workers(shards: list[Path]) -> AsyncIterator[list[RemoteWorker]]:
    """One worker daemon per shard (ids ``worker-0``...), each joined to a RemoteWorker; always stopped."""
    async with connected([daemon_for(shard, i) for i, shard in enumerate(shards)]) as remotes:
        yield remotes


def coordinator_for(remotes: list[RemoteWorker], config: dict[str, Any], progress: Progress | None = None) -> Coordinator:
    """A coordinator for ``config`` whose workers are ``remotes`` (stand-in URLs satisfy the config's checks)."""
    urls = [f"ws://in-memory-{i}:1" for i in range(len(remotes))]
    return Coordinator(parse_config({**config, "workers": urls}), workers=remotes, progress=progress)


async def run_in_memory(shards: list[Path], config: dict[str, Any]) -> Coordinator:
    """Run the whole job of ``config`` against one in-memory worker per shard; returns the finished coordinator."""
    async with in_memory_workers(shards) as remotes:
        coordinator = coordinator_for(remotes, config)
        await coordinator.run()
    return coordinator
