"""The worker daemon: listens for a coordinator, and serves train and evaluate requests from its shard.

One job at a time: a second request while one runs is refused at once with ``busy``, before its weights are
transferred. Training runs in a thread so the session keeps answering heartbeats; SIGTERM stops the job between
batches, closes the connections and ends the process with status 0.

With a ``keyring`` every coordinator must prove it holds the worker's token (and the worker proves it back)
before anything else is read; with an ``ssl_context`` the daemon listens with TLS. Whoever connects, the daemon
holds at most ``max_connections`` connections, and closes any that has not finished the handshake within
``handshake_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable

from fedlink.backoff import Backoff
from fedlink.protocol.auth import Keyring
from fedlink.protocol.channel import Channel
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import EvaluateRequest, Hello, TrainRequest
from fedlink.protocol.session import Inbound, Session, SessionOptions, handshake
from fedlink.protocol.transport import Listener, dial, listen

from . import __version__
from .errors import BadRequest, WorkerBusy
from .service import WorkerService

__all__ = ["WorkerDaemon", "dial_out"]

log = logging.getLogger("fedlink.worker")


class WorkerDaemon:
    """Network shell around a :class:`WorkerService`; :meth:`serve_channel` also works on in-memory channels."""

    def __init__(
        self,
        service: WorkerService,
        *,
        limits: Limits | None = None,
        options: SessionOptions | None = None,
        handshake_timeout: float = 10.0,
        transfer_timeout: float = 600.0,
        keyring: Keyring | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 16,
    ) -> None:
        self.service = service
        self.limits = limits or Limits()
        self.options = options or SessionOptions()
        self.handshake_timeout = handshake_timeout
        self.transfer_timeout = transfer_timeout
        self.keyring = keyring
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self._job = asyncio.Lock()
        self._stop_job = threading.Event()
        self._sessions: set[Session] = set()
        self._listener: Listener | None = None

    def hello(self) -> Hello:
        return Hello(
            role="worker",
            peer_id=self.service.worker_id,
            software=f"fedlink {__version__}",
            capabilities=("train", "evaluate", "weights", "delta", "gradients"),
            dataset=self.service.dataset_info(),
            heartbeat=self.options.heartbeat_interval,
        )

    async def serve_channel(self, channel: Channel, *, initiator: bool = False) -> None:
        """Handshake (``initiator``: this side dialled), then serve requests until the peer leaves or we stop."""
        try:
            peer = await handshake(
                channel, self.hello(), limits=self.limits, timeout=self.handshake_timeout,
                keyring=self.keyring, initiator=initiator,
            )
        except ProtocolError as exc:
            log.warning("refused connection from %s: %s", channel.peer, exc)
            await channel.close(str(exc))
            return
        session = Session(channel, peer=peer, limits=self.limits, handler=self._handle, options=self.options)
        self._sessions.add(session)
        log.info("coordinator %r connected from %s", peer.peer_id, channel.peer)
        session.start()
        try:
            reason = await session.wait_closed()
            log.info("coordinator %r disconnected: %s", peer.peer_id, reason)
        finally:
            self._sessions.discard(session)

    async def _handle(self, session: Session, inbound: Inbound) -> None:
        request = inbound.message
        if not isinstance(request, (TrainRequest, EvaluateRequest)):
            raise BadRequest(f"a worker does not serve {request.type!r} requests")
        if self._job.locked():
            raise WorkerBusy(f"worker {self.service.worker_id!r} is busy with another job")
        async with self._job:
            expected = self.service.check_model(request.model)
            state = await inbound.fetch(expected=expected, timeout=self.transfer_timeout)
            if isinstance(request, TrainRequest):
                result, update = await asyncio.to_thread(self.service.train, request, state, self._stop_job)
                del state
                await session.reply(inbound, result, state=update)
            else:
                evaluation = await asyncio.to_thread(self.service.evaluate, request, state, self._stop_job)
                await session.reply(inbound, evaluation)

    async def start(self, *, host: str, port: int) -> str:
        """Listen; returns the URL coordinators should use."""
        self._listener = await listen(
            self.serve_channel, host=host, port=port, limits=self.limits, ssl_context=self.ssl_context,
            max_connections=self.max_connections, handshake_timeout=self.handshake_timeout,
        )
        return self._listener.url

    async def stop(self) -> None:
        """Stop the running job between batches, say goodbye to every coordinator, stop listening."""
        self._stop_job.set()
        await asyncio.gather(*(s.close("worker shutting down") for s in list(self._sessions)), return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        async with self._job:  # wait for the job thread to notice the stop flag
            pass

    async def run(self, *, host: str, port: int, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
        url = await self.start(host=host, port=port)
        on_ready(url)
        await stop.wait()
        log.info("shutting down")
        await self.stop()


async def dial_out(
    daemon: WorkerDaemon,
    url: str,
    *,
    stop: asyncio.Event,
    connect_timeout: float = 10.0,
    backoff_cap: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Keep a connection to the coordinator at ``url`` (for workers behind NAT), redialling with backoff.

    Once connected, the session is served exactly as a connection the worker accepted; ``ssl_context`` verifies
    a ``wss://`` coordinator (and holds the worker's client certificate, for mutual TLS).
    """
    backoff = Backoff(cap=backoff_cap)
    while not stop.is_set():
        try:
            channel = await dial(url, limits=daemon.limits, timeout=connect_timeout, ssl_context=ssl_context)
        except ProtocolError as exc:
            delay = backoff.next_delay()
            log.warning("cannot reach coordinator: %s; retrying in %.1fs", exc, delay)
        else:
            backoff.reset()
            served = asyncio.ensure_future(daemon.serve_channel(channel, initiator=True))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({served, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                await daemon.stop()
                await served
                return
            delay = backoff.next_delay()
            log.info("connection to the coordinator ended; redialling in %.1fs", delay)
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass
