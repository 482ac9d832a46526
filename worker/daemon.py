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
import itertools
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fedlink.backoff import Backoff, keep_connected
from fedlink.protocol import capabilities
from fedlink.protocol.auth import Keyring
from fedlink.protocol.channel import Channel
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import EvaluateRequest, Hello, RoundEnd, StageRequest, TrainRequest
from fedlink.protocol.connect import open_session
from fedlink.protocol.session import Inbound, Session, SessionOptions
from fedlink.protocol.tensors import StateHeader
from fedlink.protocol.transport import Listener, dial, listen

from . import __version__
from .errors import BadRequest, WorkerBusy
from .events import DaemonEvents, observe_requests
from .service import WorkerService

__all__ = ["WorkerDaemon", "dial_out"]

log = logging.getLogger("fedlink.worker")

T = TypeVar("T")


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
        self._stop_job = threading.Event()  # the daemon is stopping: every job ends between batches
        self._jobs: set[threading.Event] = set()  # one stop event per running job, set when its session closes
        self._job_rounds: dict[threading.Event, tuple[str, int]] = {}  # job -> (run, round) it serves
        self._job_ids = itertools.count(1)
        self._sessions: set[Session] = set()
        self._listener: Listener | None = None
        self.events = DaemonEvents()  # monitoring (fl-worker --metrics-port): set before serving

    def hello(self) -> Hello:
        return Hello(
            role="worker",
            peer_id=self.service.worker_id,
            software=f"fedlink {__version__}",
            capabilities=("train", "evaluate", "stages", "weights", "delta", "gradients", *capabilities.TRANSFER),
            dataset=self.service.dataset_info(),
            heartbeat=self.options.heartbeat_interval,
        )

    async def serve_channel(self, channel: Channel, *, initiator: bool = False) -> None:
        """Handshake (``initiator``: this side dialled), then serve requests until the peer leaves or we stop."""
        try:
            session = await open_session(
                channel, self.hello(), limits=self.limits, timeout=self.handshake_timeout, keyring=self.keyring,
                initiator=initiator, options=self.options, handler=observe_requests(self._handle, self.events),
                start=False,
            )
        except ProtocolError as exc:
            log.warning("refused connection from %s: %s", channel.peer, exc)
            self.events.handshake_refused(channel.peer, exc)
            return
        peer = session.peer_hello
        self._sessions.add(session)
        self.events.session_opened(session)
        log.info("coordinator %r connected from %s", peer.peer_id, channel.peer)
        session.start()
        try:
            reason = await session.wait_closed()
            log.info("coordinator %r disconnected: %s", peer.peer_id, reason)
        finally:
            self._sessions.discard(session)
            self.events.session_closed(session, session.close_reason or "")

    async def _handle(self, session: Session, inbound: Inbound) -> None:
        request = inbound.message
        if isinstance(request, RoundEnd):
            self.service.memory.end_round(request.run, request.round)
            # A round that ended (the coordinator dropped this worker at its deadline, say) needs no more work:
            # its job stops at its next check, and the worker is free for the next round or its retry.
            for job, key in list(self._job_rounds.items()):
                if key == (request.run, request.round):
                    job.set()
            return
        if not isinstance(request, (TrainRequest, EvaluateRequest, StageRequest)):
            raise BadRequest(f"a worker does not serve {request.type!r} requests")
        if self._job.locked() and not (self._jobs and all(job.is_set() for job in self._jobs)):
            raise WorkerBusy(f"worker {self.service.worker_id!r} is busy with another job")
        # Either free, or only a cancelled job winding down (it stops at its next check): wait for it, bounded.
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await self._job.acquire()
        except TimeoutError:
            raise WorkerBusy(f"worker {self.service.worker_id!r} is still ending a cancelled job") from None
        try:
            # The operator's policy first: a refused request costs no transfer, no import and no model.
            self.service.gate.check(request)
            job = threading.Event()
            if self._stop_job.is_set():
                job.set()
            self._jobs.add(job)
            self._job_rounds[job] = (request.run, request.round)
            number = next(self._job_ids)
            log.info("job %d started: %s %s", number, request.type, getattr(request, "task_id", ""))
            try:
                await self._serve_job(session, inbound, request, job)
            finally:
                self._jobs.discard(job)
                self._job_rounds.pop(job, None)
                log.info("job %d ended", number)
        finally:
            self._job.release()

    async def _serve_job(
        self, session: Session, inbound: Inbound, request: TrainRequest | EvaluateRequest | StageRequest,
        job: threading.Event,
    ) -> None:
        if isinstance(request, StageRequest):
            await self._stage(session, inbound, request, job)
            return
        # Built on the meta device within --max-state-mb, in a thread: a pending request never holds the loop.
        expected = await self._in_thread(job, self._header, request, job, inbound.state_header)
        state = await inbound.fetch(expected=expected, timeout=self.transfer_timeout)
        if isinstance(request, TrainRequest):
            result, update = await self._in_thread(job, self.service.train, request, state, job)
            del state
            await session.reply(inbound, result, state=update)
        else:
            evaluation = await self._in_thread(job, self.service.evaluate, request, state, job)
            await session.reply(inbound, evaluation)

    def _header(
        self, request: TrainRequest | EvaluateRequest, job: threading.Event, announced: StateHeader | None
    ) -> Any:
        with self.service.build_limits(job):
            if isinstance(request, TrainRequest):
                return self.service.train_header(request, announced)
            return self.service.check_model(request.model)

    async def _in_thread(self, job: threading.Event, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a thread and return only once that thread has really finished.

        When the session closes (the handler is cancelled), the job's stop event is set, so the work ends at its
        next check (between batches, or between modules while a model is built), and the job lock is held until
        it has: one job at a time means one thread at a time, whatever coordinators do.
        """
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            job.set()
            while not work.done():
                try:
                    await asyncio.wait({work})
                except asyncio.CancelledError:
                    continue
            if not work.cancelled():
                work.exception()  # retrieved: the job's own error does not matter once its session is gone
            raise

    async def _stage(self, session: Session, inbound: Inbound, request: StageRequest, job: threading.Event) -> None:
        """A stage of a multi-stage round: refused (bad handler, bad payload, unwanted state) before bytes move."""
        handler, context, parsed = self.service.stage_handler(request)
        state = None
        if inbound.state_header is not None:
            expected = handler.expected_state(context, parsed)
            if not handler.takes_state or expected is None:
                raise BadRequest(f"stage {request.stage!r} takes no model state, but one was announced")
            state = await inbound.fetch(expected=expected, timeout=self.transfer_timeout)
        result, out_state = await self._in_thread(
            job, self.service.run_stage, handler, context, request, parsed, state, job
        )
        await session.reply(inbound, result, state=out_state)

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
        for job in list(self._jobs):
            job.set()
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

    async def serve_once() -> bool:
        try:
            channel = await dial(url, limits=daemon.limits, timeout=connect_timeout, ssl_context=ssl_context)
        except ProtocolError as exc:
            log.warning("cannot reach coordinator: %s", exc)
            return False
        served = asyncio.ensure_future(daemon.serve_channel(channel, initiator=True))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({served, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            await daemon.stop()
            await served
        else:
            log.info("connection to the coordinator ended")
        return True

    def on_retry(delay: float) -> None:
        log.info("redialling the coordinator in %.1fs", delay)

    await keep_connected(serve_once, stop=stop, backoff=Backoff(cap=backoff_cap), on_retry=on_retry)
