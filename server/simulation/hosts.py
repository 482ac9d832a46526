"""The simulation's hosts as the coordinator holds them: started, connected, watched and stopped.

A host (:mod:`fedlink.worker.virtual_host`) is a long-lived worker-side server for many virtual workers. The
``local`` backend starts them as child processes of the coordinator; the ``ray`` backend as Ray actors, with
``resources`` reserved for each. Either way the coordinator reaches a host only over fedlink's own protocol (a
token-authenticated WebSocket session): nothing is pickled between them, whatever the backend.

:class:`HostTable` routes each virtual worker to its home host (``index % hosts``), and past a host that has
failed to the next live one: its virtual workers are served elsewhere from the next request on (their per-run
memory, kept on the failed host, is lost, as with a restarted worker). A failure is logged at once with what
the backend knows of it (the process's exit status, the actor's traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
from abc import ABC, abstractmethod
from typing import Any

from fedlink.errors import FedlinkError
from fedlink.protocol.connect import Refused, open_session
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.session import Session, SessionOptions
from fedlink.protocol.transport import dial
from fedlink.worker.virtual_host import HostSpec, keyring_for

__all__ = ["SimulationError", "HostTable", "Backend", "LocalBackend", "RayBackend", "RAY_INSTALL"]

log = logging.getLogger("fedlink.server")

RAY_INSTALL = "pip install 'fedlink[ray]'"


class SimulationError(FedlinkError):
    code = "simulation_error"


class Backend(ABC):
    """Starts ``count`` hosts and says where each listens; reports what it knows of a failed one."""

    async def prepare(self, count: int) -> None:  # noqa: B027 - optional: a backend may start everything in start()
        """Begin starting ``count`` hosts before their specs are known (the partition is still being drawn)."""

    @abstractmethod
    async def start(self, specs: list[HostSpec], token: str) -> list[str]: ...

    @abstractmethod
    async def describe_failure(self, index: int) -> str: ...

    @abstractmethod
    async def close(self) -> None: ...


class LocalBackend(Backend):
    """Host processes on this machine, on loopback; a host exits when the coordinator closes its standard input."""

    def __init__(self, *, ready_timeout: float = 120.0) -> None:
        self.ready_timeout = ready_timeout
        self.processes: list[asyncio.subprocess.Process] = []

    async def prepare(self, count: int) -> None:
        """Spawn the processes now: they import torch while the coordinator draws the partition."""
        while len(self.processes) < count:
            self.processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "fedlink.worker.virtual_host",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )
            )

    async def start(self, specs: list[HostSpec], token: str) -> list[str]:
        await self.prepare(len(specs))
        for spec, process in zip(specs, self.processes):
            assert process.stdin is not None
            process.stdin.write((json.dumps({"spec": spec.model_dump(mode="json"), "token": token}) + "\n").encode())
            await process.stdin.drain()
        return [await self._ready(i, p) for i, p in enumerate(self.processes)]

    async def _ready(self, index: int, process: asyncio.subprocess.Process) -> str:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self.ready_timeout):
                line = (await process.stdout.readline()).decode(errors="replace").strip()
        except TimeoutError:
            raise SimulationError(f"simulation host {index} did not start within {self.ready_timeout:g}s") from None
        if not line.startswith("ready "):
            status = await process.wait()
            raise SimulationError(
                f"simulation host {index} exited with status {status} before listening (its error is above)"
            )
        return line.removeprefix("ready ")

    async def describe_failure(self, index: int) -> str:
        process = self.processes[index]
        try:
            async with asyncio.timeout(5.0):
                status = await process.wait()
        except TimeoutError:
            return f"process {process.pid} is still running but its connection ended"
        return f"process {process.pid} exited with status {status} (its traceback, if any, is above)"

    async def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None and not process.stdin.is_closing():
                process.stdin.close()
        for process in self.processes:
            try:
                async with asyncio.timeout(30.0):
                    await process.wait()
            except TimeoutError:
                log.warning("simulation host process %d did not stop within 30s; killing it", process.pid)
                process.kill()
                await process.wait()


class RayBackend(Backend):
    """Ray actors, one host each, reserving ``cpus``/``gpus``; on ``address`` or a local Ray started here."""

    def __init__(self, *, address: str | None, cpus: float, gpus: float, ready_timeout: float = 300.0) -> None:
        try:
            import ray
        except ImportError as exc:
            raise SimulationError(f"simulation backend ray needs Ray, which is not installed: {RAY_INSTALL}") from exc
        self._ray: Any = ray
        self.address = address
        self.cpus = cpus
        self.gpus = gpus
        self.ready_timeout = ready_timeout
        self.actors: list[Any] = []
        self._started_ray = False

    async def start(self, specs: list[HostSpec], token: str) -> list[str]:
        from .ray_actor import HostActor

        ray = self._ray
        if not ray.is_initialized():
            await asyncio.to_thread(
                ray.init, address=self.address, include_dashboard=False, log_to_driver=True,
                logging_level=logging.WARNING,
            )
            self._started_ray = True
        actor_class = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)(HostActor)
        self.actors = [actor_class.remote() for _ in specs]
        pending = [a.start.remote(json.dumps({"spec": s.model_dump(mode="json"), "token": token})) for a, s in zip(self.actors, specs)]
        try:
            urls: list[str] = await asyncio.to_thread(ray.get, pending, timeout=self.ready_timeout)
        except Exception as exc:  # noqa: BLE001 - Ray reports an actor's failure as many exception types
            raise SimulationError(f"simulation hosts (Ray actors) did not start: {exc}") from exc
        return urls

    async def describe_failure(self, index: int) -> str:
        try:
            await asyncio.to_thread(self._ray.get, self.actors[index].ping.remote(), timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - RayActorError carries the actor's traceback in its text
            return f"Ray actor failed: {exc}"
        return "Ray actor is alive but its connection ended"

    async def close(self) -> None:
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - an actor that already died cannot be killed again
                pass
        if self._started_ray:
            await asyncio.to_thread(ray.shutdown)


class HostTable:
    """The hosts' sessions; routes virtual worker ``index`` to a live host, its home one while that lives."""

    def __init__(self, backend: Backend, *, hello: Hello, limits: Limits, options: SessionOptions) -> None:
        self.backend = backend
        self.hello = hello
        self.limits = limits
        self.options = options
        self.sessions: list[Session] = []
        self.failures: list[str] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._closing = False
        self.token = secrets.token_urlsafe(32)

    def session_for(self, index: int) -> Session | None:
        count = len(self.sessions)
        for step in range(count):
            session = self.sessions[(index + step) % count]
            if not session.closed:
                return session
        return None

    def host_of(self, index: int) -> int | None:
        session = self.session_for(index)
        return None if session is None else self.sessions.index(session)

    async def start(self, specs: list[HostSpec]) -> None:
        urls = await self.backend.start(specs, self.token)
        keyring = keyring_for(self.token)

        def check(peer: Hello) -> None:
            if peer.role != "worker":
                raise Refused("not_a_worker", f"a simulation host answered as a {peer.role}")

        for index, url in enumerate(urls):
            try:
                channel = await dial(url, limits=self.limits, timeout=30.0)
                session = await open_session(
                    channel, self.hello, limits=self.limits, timeout=30.0, keyring=keyring, initiator=True,
                    options=self.options, admit=check,
                )
            except ProtocolError as exc:
                raise SimulationError(f"cannot connect to simulation host {index} at {url}: {exc}") from exc
            self.sessions.append(session)
            self._watchers.append(asyncio.ensure_future(self._watch(index, session)))
        log.info("simulation: %d hosts ready (%s)", len(urls), ", ".join(urls))

    async def _watch(self, index: int, session: Session) -> None:
        reason = await session.wait_closed()
        if self._closing:
            return
        detail = await self.backend.describe_failure(index)
        moved = self.host_of(index)
        where = f"host {moved}" if moved is not None else "no host: every host has failed"
        message = f"simulation host {index} failed ({reason}): {detail}; its virtual workers move to {where}"
        self.failures.append(message)
        log.error("%s", message)

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(s.close("simulation finished") for s in self.sessions), return_exceptions=True)
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.backend.close()
