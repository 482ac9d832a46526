"""Many virtual workers in one long-lived process: the worker side of ``fl-coordinator simulate``.

A :class:`VirtualHost` holds one data set and its partition into virtual workers, and serves the coordinator
over fedlink's own session and codec (loopback WebSockets, token-authenticated), exactly as a worker daemon
does. Each request names its virtual worker (``worker`` in the request); the host runs it with a
:class:`~.service.WorkerService` over that virtual worker's shard, so hooks, updates and policy are the worker's
own code, never a copy. What a virtual worker keeps between rounds (error-feedback residuals, privacy
accountants: its :class:`~.memory.WorkerMemory`) is kept under its id for the whole run, and only for the
virtual workers that have been asked something: memory does not grow with the workers never sampled.

Jobs run one after another in the order they arrive (the coordinator sends a round's requests in cohort order),
with at most two global states fetched ahead, so a host holds a bounded number of model copies whatever the
cohort size. Shards are cut from the data set on demand (``x[indices]``), never all at once.

Run as a process (``python -m fedlink.worker.virtual_host``), the host reads one JSON line from standard input
(its :class:`HostSpec` and the session token), prints ``ready URL`` once it listens, and exits when its standard
input closes: a coordinator that dies takes its hosts with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedlink.factory import ModelAllowList
from fedlink.plugins import PluginAllowList
from fedlink.protocol import capabilities
from fedlink.protocol.auth import Keyring, Secret
from fedlink.protocol.channel import Channel
from fedlink.protocol.connect import open_session
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import (
    DatasetInfo,
    EvaluateRequest,
    Hello,
    Message,
    RoundEnd,
    StageRequest,
    TrainRequest,
)
from fedlink.protocol.session import Inbound, Session, SessionOptions
from fedlink.protocol.tensors import StateHeader
from fedlink.protocol.transport import Listener, listen
from fedlink.shards import Shard, load_shard

from . import __version__
from .errors import BadRequest
from .memory import WorkerMemory
from .policy import PolicyGate, WorkerPolicy
from .service import WorkerService

__all__ = ["HostSpec", "VirtualHost", "virtual_id", "load_partition", "save_partition", "main"]

log = logging.getLogger("fedlink.worker")

_PREFIX = "sim-"


def virtual_id(index: int) -> str:
    """The id of virtual worker ``index``: what seeds, metrics and checkpoints key on."""
    return f"{_PREFIX}{index}"


def save_partition(path: Path, parts: list[np.ndarray]) -> Path:
    """Write a partition as two plain int64 arrays (``offsets``, ``indices``) that load without pickle."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    indices = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        np.savez(file, offsets=offsets, indices=indices)
    return path


def load_partition(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as file, np.load(file, allow_pickle=False) as archive:
        return np.asarray(archive["offsets"]), np.asarray(archive["indices"])


class HostSpec(BaseModel):
    """Everything a host needs, as JSON: no pickled objects cross into a host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    data: str
    partition: str
    device: str = "cpu"
    threads: int = Field(1, ge=1, le=1024)
    gpu_fraction: float = Field(0.0, ge=0, le=64)
    heartbeat: float = 5.0
    model_patterns: tuple[str, ...] = ("*",)
    policy: WorkerPolicy = WorkerPolicy(min_batch_size=1, min_samples=1)
    plugin_patterns: tuple[str, ...] = ()


class VirtualHost:
    """Serves the virtual workers of one partition; every host of a simulation can serve every virtual worker."""

    def __init__(self, spec: HostSpec, *, keyring: Keyring | None, limits: Limits | None = None) -> None:
        self.spec = spec
        self.keyring = keyring
        self.limits = limits or Limits()
        shard = load_shard(spec.data)
        self._path, self._x, self._y = shard.path, shard.x, shard.y
        self._offsets, self._indices = load_partition(Path(spec.partition))
        if self._offsets.size < 2 or int(self._offsets[-1]) != self._indices.size:
            raise BadRequest(f"partition {spec.partition} is inconsistent; delete it and start again")
        if self._indices.size and int(self._indices.max()) >= self._y.shape[0]:
            raise BadRequest(f"partition {spec.partition} does not fit data {spec.data}; delete it and start again")
        self._allow = ModelAllowList(spec.model_patterns)
        self._plugins = PluginAllowList(spec.plugin_patterns)
        self._memories: dict[str, WorkerMemory] = {}
        self._gates: dict[str, PolicyGate] = {}
        self._job = asyncio.Lock()
        self._intake = asyncio.Semaphore(2)  # global states fetched and not yet trained on
        self._stop_job = threading.Event()
        self._sessions: set[Session] = set()
        self._listener: Listener | None = None
        self.options = SessionOptions(
            heartbeat_interval=spec.heartbeat, heartbeat_timeout=6 * spec.heartbeat, inbound_slots=2, max_outbound=64
        )
        self.served = 0

    @property
    def workers(self) -> int:
        return int(self._offsets.size - 1)

    @property
    def remembered(self) -> int:
        """How many virtual workers have state here (those that were asked something)."""
        return len(self._memories)

    def hello(self) -> Hello:
        return Hello(
            role="worker",
            peer_id=f"sim-host-{self.spec.index}",
            software=f"fedlink {__version__}",
            # Not download/cached: a host keeping a global state per virtual worker would hold thousands of models.
            capabilities=(
                "train", "evaluate", "stages", "weights", "delta", "gradients", "virtual",
                *(c for c in capabilities.TRANSFER if c != capabilities.DOWNLOAD_CACHED),
            ),
            dataset=DatasetInfo(
                num_samples=int(self._y.shape[0]), sample_shape=tuple(int(d) for d in self._x.shape[1:]),
                x_dtype=str(self._x.dtype.name),
            ),
            heartbeat=self.options.heartbeat_interval,
        )

    def service(self, worker: str | None) -> WorkerService:
        """The worker's own logic over virtual worker ``worker``'s shard, with that worker's memory."""
        index = self._index(worker)
        rows = self._indices[self._offsets[index]:self._offsets[index + 1]]
        shard = Shard(path=Path(f"{self._path}#{worker}"), x=self._x[rows], y=self._y[rows])
        assert worker is not None
        service = WorkerService(
            shard, allow=self._allow, device=self.spec.device, worker_id=worker, plugins=self._plugins,
            policy=self.spec.policy,
        )
        service.memory = self._memories.setdefault(worker, WorkerMemory(max_runs=2))
        service.gate = self._gates.setdefault(worker, service.gate)  # its request log, for max_requests_per_hour
        return service

    def _index(self, worker: str | None) -> int:
        if worker is None:
            raise BadRequest("a simulation host serves virtual workers: the request must name one (worker)")
        digits = worker.removeprefix(_PREFIX)
        if not worker.startswith(_PREFIX) or not digits.isdigit() or int(digits) >= self.workers:
            raise BadRequest(f"no virtual worker {worker!r} here (sim-0 to sim-{self.workers - 1})")
        return int(digits)

    async def serve_channel(self, channel: Channel, *, initiator: bool = False) -> None:
        try:
            session = await open_session(
                channel, self.hello(), limits=self.limits, timeout=10.0, keyring=self.keyring, initiator=initiator,
                options=self.options, handler=self._handle, start=False,
            )
        except ProtocolError as exc:
            log.warning("refused connection from %s: %s", channel.peer, exc)
            return
        self._sessions.add(session)
        session.start()
        try:
            await session.wait_closed()
        finally:
            self._sessions.discard(session)

    async def _handle(self, session: Session, inbound: Inbound) -> None:
        request = inbound.message
        if isinstance(request, RoundEnd):
            memory = self._memories.get(request.worker or "")
            if memory is not None:
                memory.end_round(request.run, request.round)
            return
        if not isinstance(request, (TrainRequest, EvaluateRequest, StageRequest)):
            raise BadRequest(f"a worker does not serve {request.type!r} requests")
        service = self.service(request.worker)
        service.gate.check(request)  # the operator's policy first, as on a real worker
        async with self._intake:
            if isinstance(request, StageRequest):
                await self._stage(session, inbound, request, service)
                return
            expected = await asyncio.to_thread(self._header, service, request)
            state = await inbound.fetch(expected=expected)
            async with self._job:
                if isinstance(request, TrainRequest):
                    trained, update = await asyncio.to_thread(service.train, request, state, self._stop_job)
                    del state
                    self.served += 1
                    reply: Message = trained
                else:
                    reply, update = await asyncio.to_thread(service.evaluate, request, state, self._stop_job), None
        await session.reply(inbound, reply, state=update)

    def _header(self, service: WorkerService, request: TrainRequest | EvaluateRequest) -> StateHeader:
        with service.build_limits(self._stop_job):
            if isinstance(request, TrainRequest):
                return service.train_header(request)
            return service.check_model(request.model)

    async def _stage(self, session: Session, inbound: Inbound, request: StageRequest, service: WorkerService) -> None:
        handler, context, parsed = service.stage_handler(request)
        state = None
        if inbound.state_header is not None:
            expected = handler.expected_state(context, parsed)
            if not handler.takes_state or expected is None:
                raise BadRequest(f"stage {request.stage!r} takes no model state, but one was announced")
            state = await inbound.fetch(expected=expected)
        async with self._job:
            result, out_state = await asyncio.to_thread(
                service.run_stage, handler, context, request, parsed, state, self._stop_job
            )
        await session.reply(inbound, result, state=out_state)

    async def start(self, *, host: str, port: int) -> str:
        self._listener = await listen(self.serve_channel, host=host, port=port, limits=self.limits, max_connections=4)
        return self._listener.url

    async def stop(self) -> None:
        self._stop_job.set()
        await asyncio.gather(*(s.close("simulation host stopping") for s in list(self._sessions)), return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        async with self._job:
            pass


def configure_process(spec: HostSpec) -> None:
    """Threads and GPU share of this process: ``resources.cpus`` torch threads, ``resources.gpus`` of the memory."""
    torch.set_num_threads(spec.threads)
    if spec.gpu_fraction > 0 and spec.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(spec.device)
        torch.cuda.set_per_process_memory_fraction(min(spec.gpu_fraction, 1.0), device)


def keyring_for(token: str) -> Keyring:
    return Keyring(shared=Secret.from_token(token.encode(), origin="the simulation's session token"))


async def _serve(spec: HostSpec, token: str, stop: asyncio.Event) -> None:
    host = VirtualHost(spec, keyring=keyring_for(token))
    url = await host.start(host="127.0.0.1", port=0)
    sys.stdout.write(f"ready {url}\n")
    sys.stdout.flush()
    await stop.wait()
    await host.stop()


def main() -> None:
    """Entry point of a local host process (started by ``fl-coordinator simulate``, not by hand)."""
    logging.basicConfig(  # force: opacus configures logging when it is imported
        level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    line = sys.stdin.readline()
    if not line:  # the coordinator stopped before sending the start line (the run failed early): nothing to do
        return
    try:
        given = json.loads(line)
        spec = HostSpec.model_validate(given["spec"])
        token = str(given["token"])
    except (ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"fedlink simulation host: bad start line on standard input: {exc}\n")
        raise SystemExit(2) from exc
    configure_process(spec)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def watch_stdin() -> None:  # the coordinator closing our stdin (or dying) is the signal to leave
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
        await _serve(spec, token, stop)

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    main()
