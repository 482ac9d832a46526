"""``fl-coordinator simulate``: a job's rounds over virtual workers, with the coordinator and round engine of ``train``.

How it fits together:

* The data set named by ``simulation.data`` is cut into ``simulation.workers`` virtual shards by the split of
  ``fl-coordinator split`` (the same functions, seeded by the job's ``seed``), written once as index arrays
  (``OUTPUT/partition.npz``). Hosts cut each virtual shard from it on demand, so nothing grows with the
  virtual workers that are not sampled.
* A few long-lived hosts (:mod:`fedlink.worker.virtual_host`: processes for ``backend: local``, Ray actors for
  ``backend: ray``) run the worker's own :class:`~fedlink.worker.service.WorkerService` for each request, one
  virtual worker after another, with the model and data in place; see :mod:`.hosts`.
* Each virtual worker is a :class:`VirtualWorker`: to the engine, a :class:`~fedlink.server.remote.RemoteWorker`
  like any other, whose requests name it (``worker``) on its host's shared session. The real
  :class:`~fedlink.server.coordinator.Coordinator` samples cohorts, runs the strategy's stages, evaluates,
  checkpoints and writes ``metrics.jsonl`` and ``workers.jsonl``, never knowing the workers are virtual.

Determinism: every virtual worker's update comes back on its own (not pre-summed) and is folded by the train
stage in the cohort's fixed order, with the strategy's own aggregation, exactly as for real workers. Each
update depends only on the global state, the virtual worker's shard and its seed (``derive_seed(seed, round,
id)``), and each host trains with the same number of torch threads (``resources.cpus``), so the final model
is the same bit for bit whichever backend runs it and with any number of processes. Pre-summed partials would
save transfers but make the sum's order depend on which host trained whom (floating-point addition is not
associative); a loopback transfer costs far less than training a client, so we keep the order instead.

Each round's record gains ``client_updates_per_second`` (updates folded per second of the round); the first
round run also ``startup_seconds`` (from the call to the hosts being ready).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlink.protocol.messages import Hello
from fedlink.protocol.session import Session, SessionOptions
from fedlink.shards import load_shard
from fedlink.worker.virtual_host import HostSpec, save_partition, virtual_id

from .. import __version__
from .. import split as splitting
from ..config import JobConfig
from ..coordinator import Coordinator
from ..errors import ConfigError
from ..progress import Progress
from ..remote import RemoteWorker
from ..rounds import RoundReport
from .config import SimulationConfig
from .hosts import Backend, HostTable, LocalBackend, RayBackend, SimulationError

__all__ = [
    "VirtualWorker",
    "SimulationCoordinator",
    "SimulationDisplay",
    "partition_data",
    "simulate_async",
    "SimulationError",
]

log = logging.getLogger("fedlink.server")

PARTITION_FILE = "partition.npz"


def partition_data(simulation: SimulationConfig, seed: int) -> list[np.ndarray]:
    """The virtual workers' index arrays, drawn exactly as ``fl-coordinator split --seed SEED`` draws them."""
    labels = load_shard(simulation.data).y
    rng = np.random.default_rng(seed)
    part = simulation.partition
    n = simulation.workers
    if part.kind == "dirichlet":
        return splitting.partition_dirichlet(labels, n, part.value, rng)
    if part.kind == "classes_per_worker":
        return splitting.partition_classes(labels, n, int(part.value), rng)
    if part.kind == "quantity":
        return splitting.partition_quantity(len(labels), n, part.value, rng)
    return splitting.partition_iid(len(labels), n, rng)


class VirtualWorker(RemoteWorker):
    """One virtual worker as the engine sees it: its id, its shard's size, and its host's (shared) session."""

    def __init__(self, index: int, *, hosts: HostTable, num_samples: int) -> None:
        self._hosts = hosts
        super().__init__(f"sim://{virtual_id(index)}")
        self.index = index
        self.route = virtual_id(index)
        self._num_samples = num_samples

    @property  # type: ignore[override]
    def session(self) -> Session | None:
        return self._hosts.session_for(self.index)

    @session.setter
    def session(self, value: Session | None) -> None:
        """Sessions belong to the hosts, not to one virtual worker: nothing to set here."""

    @property
    def name(self) -> str:
        return virtual_id(self.index)

    @property
    def num_samples(self) -> int:
        return self._num_samples

    async def close(self, reason: str) -> None:
        """The hosts' sessions are closed once, by the simulation, not by each of their virtual workers."""


class SimulationCoordinator(Coordinator):
    """The coordinator of ``train``, over virtual workers; rounds also report client updates per second, and
    the first round run also the seconds from the simulation's start to its hosts being ready."""

    startup_seconds: float | None = None

    async def _finish_round(self, report: RoundReport) -> dict[str, Any]:
        record = await super()._finish_round(report)
        updates = len(report.contributed)
        record["client_updates_per_second"] = updates / report.seconds if report.seconds > 0 else 0.0
        if self.startup_seconds is not None:
            record["startup_seconds"], self.startup_seconds = self.startup_seconds, None
        return record


class SimulationDisplay(Progress):
    """The run's display without a row per virtual worker (thousands of them): rounds, and a line per failure."""

    def __init__(self, display: Progress, *, show_workers: bool) -> None:
        self.display = display
        self.show_workers = show_workers

    def __enter__(self) -> "SimulationDisplay":
        self.display.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.display.__exit__(*exc)

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        self.display.run_started(name, rounds, workers)

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if self.show_workers or status == "dropped":
            self.display.worker_status(server_round, worker, status, detail)

    def round_finished(self, record: dict[str, Any]) -> None:
        self.display.round_finished(record)

    def stage_finished(self, server_round: int, stage: str, seconds: float, outcomes: Sequence[Any]) -> None:
        self.display.stage_finished(server_round, stage, seconds, outcomes)


def _backend(simulation: SimulationConfig) -> Backend:
    if simulation.backend == "ray":
        return RayBackend(address=simulation.ray_address, cpus=simulation.resources.cpus, gpus=simulation.resources.gpus)
    return LocalBackend()


def _specs(config: JobConfig, partition: Path) -> list[HostSpec]:
    simulation = config.simulation
    assert simulation is not None
    return [
        HostSpec(
            index=i, data=str(simulation.data.resolve()), partition=str(partition.resolve()), device=config.device,
            threads=simulation.resources.threads, gpu_fraction=simulation.resources.gpus,
            heartbeat=config.timeouts.heartbeat, policy=simulation.policy,
        )
        for i in range(simulation.processes)
    ]


async def simulate_async(
    config: JobConfig, *, progress: Progress | None = None, resume: bool = False,
    backend: Backend | None = None,
) -> list[dict[str, Any]]:
    """Run ``config``'s rounds over its virtual workers; returns one record per round, as ``train`` does.

    ``backend`` replaces the one ``simulation.backend`` names (tests hand in their own).
    """
    simulation = config.simulation
    if simulation is None:
        raise ConfigError("this config has no simulation section; fl-coordinator train runs real workers")
    started = time.perf_counter()
    options = SessionOptions(
        inbound_slots=4, heartbeat_interval=config.timeouts.heartbeat, heartbeat_timeout=6 * config.timeouts.heartbeat
    )
    hello = Hello(
        role="coordinator", peer_id=config.name, software=f"fedlink {__version__}", heartbeat=config.timeouts.heartbeat
    )
    hosts = HostTable(backend or _backend(simulation), hello=hello, limits=config.limits, options=options)
    try:
        await hosts.backend.prepare(simulation.processes)  # hosts import torch while the partition is drawn
        parts = await asyncio.to_thread(partition_data, simulation, config.seed)
        partition = await asyncio.to_thread(save_partition, config.output / PARTITION_FILE, parts)
        sizes = [int(p.shape[0]) for p in parts]
        del parts
        await hosts.start(_specs(config, partition))
        workers: list[RemoteWorker] = [VirtualWorker(i, hosts=hosts, num_samples=n) for i, n in enumerate(sizes)]
        coordinator = SimulationCoordinator(config, progress=progress, workers=workers, options=options)
        coordinator.startup_seconds = time.perf_counter() - started
        if progress is not None and hasattr(progress, "bind"):
            progress.bind(coordinator)
        log.info(
            "simulation: %d virtual workers on %d %s host(s), ready in %.2fs",
            len(workers), simulation.processes, simulation.backend, time.perf_counter() - started,
        )
        return await coordinator.run(resume=resume)
    finally:
        await hosts.close()
