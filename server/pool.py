"""The coordinator's workers and their connections, kept alive for the whole run.

Workers listed in the config are dialled, and re-dialled with exponential backoff whenever their connection
drops, so a worker that restarts is re-admitted on its own. Workers behind NAT dial in to the coordinator's
listener instead (``fl-worker --connect``) and are known by their worker id; a worker that dials in again
replaces its old session -- but only when it authenticated (``listen_keyring``): without a token nothing shows
that the newcomer is the same worker, so an unauthenticated one is refused while the id is connected. After the
handshake both kinds are the same :class:`RemoteWorker`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence

from fedlink.backoff import Backoff
from fedlink.protocol.auth import Keyring
from fedlink.protocol.channel import Channel
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.frames import encode_message
from fedlink.protocol.messages import ErrorMessage, Hello
from fedlink.protocol.session import Session, SessionOptions, handshake
from fedlink.protocol.transport import Listener, listen

from .errors import NotEnoughWorkers
from .remote import RemoteWorker

__all__ = ["WorkerPool"]

log = logging.getLogger("fedlink.server")


class WorkerPool:
    def __init__(
        self,
        workers: Sequence[RemoteWorker],
        *,
        hello: Hello,
        limits: Limits,
        options: SessionOptions,
        connect_timeout: float,
        backoff_cap: float = 10.0,
        listen_keyring: Keyring | None = None,
        listen_ssl: ssl.SSLContext | None = None,
        max_connections: int = 1024,
    ) -> None:
        self.configured = list(workers)
        self.dialled_in: dict[str, RemoteWorker] = {}
        self._hello = hello
        self._limits = limits
        self._options = options
        self._connect_timeout = connect_timeout
        self._backoff_cap = backoff_cap
        self._listen_keyring = listen_keyring
        self._listen_ssl = listen_ssl
        self._max_connections = max_connections
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: Listener | None = None
        self._closing = False

    # -- membership --------------------------------------------------------------------------------------------

    def all(self) -> list[RemoteWorker]:
        """Configured workers in config order, then dialled-in workers by id: the fixed order of every round."""
        return self.configured + [self.dialled_in[k] for k in sorted(self.dialled_in)]

    def connected(self) -> list[RemoteWorker]:
        return [w for w in self.all() if w.connected]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, count: int, *, timeout: float) -> list[RemoteWorker]:
        """Wait until ``count`` workers are connected; raise NotEnoughWorkers naming the missing ones if not."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: len(self.connected()) >= count)
        except TimeoutError:
            missing = "; ".join(f"{w.url}: {w.last_error or 'not connected'}" for w in self.all() if not w.connected)
            raise NotEnoughWorkers(
                f"{len(self.connected())} workers reachable after waiting {timeout:g}s, "
                f"sampling.min_workers is {count}" + (f" ({missing})" if missing else "")
            ) from None
        return self.connected()

    # -- dialling out ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Dial every configured ``ws://``/``wss://`` worker once, together, then keep each connected.

        The first attempt is awaited, so the first round sees every worker that was reachable at the start.
        """
        dialled = [w for w in self.configured if w.url.startswith(("ws://", "wss://"))]
        await asyncio.gather(
            *(
                w.connect(hello=self._hello, limits=self._limits, timeout=self._connect_timeout, options=self._options)
                for w in dialled
            )
        )
        for worker in dialled:
            self._tasks.append(asyncio.ensure_future(self._keep_connected(worker)))

    async def _keep_connected(self, worker: RemoteWorker) -> None:
        backoff = Backoff(cap=self._backoff_cap)
        while not self._closing:
            ok = await worker.connect(
                hello=self._hello, limits=self._limits, timeout=self._connect_timeout, options=self._options
            )
            if ok:
                backoff.reset()
                await self._notify()
                assert worker.session is not None
                reason = await worker.session.wait_closed()
                if self._closing:
                    return
                worker.last_error = reason
                log.warning("lost worker %r (%s): %s; reconnecting", worker.name, worker.url, reason)
                await self._notify()
            else:
                if backoff.attempt == 0:
                    log.warning("cannot reach worker %s: %s; retrying", worker.url, worker.last_error)
                await asyncio.sleep(backoff.next_delay())

    # -- dialling in -------------------------------------------------------------------------------------------

    async def listen(self, *, host: str, port: int) -> str:
        self._listener = await listen(
            self._accept, host=host, port=port, limits=self._limits, ssl_context=self._listen_ssl,
            max_connections=self._max_connections, handshake_timeout=self._connect_timeout,
        )
        log.info("listening for workers on %s", self._listener.url)
        return self._listener.url

    async def _accept(self, channel: Channel) -> None:
        try:
            peer = await handshake(
                channel, self._hello, limits=self._limits, timeout=self._connect_timeout,
                keyring=self._listen_keyring, initiator=False,
            )
        except ProtocolError as exc:
            log.warning("refused connection from %s: %s", channel.peer, exc)
            await channel.close(str(exc))
            return
        worker = self.dialled_in.get(peer.peer_id)
        if worker is not None and worker.connected and not self._listen_keyring:
            problem = (
                f"worker id {peer.peer_id!r} is already connected; without a token this listener cannot tell "
                "whether the new connection is the same worker, so it keeps the old one (set auth.token_file "
                "or auth.workers to let a worker that reconnects replace its old session)"
            )
            log.warning("refused connection from %s: %s", channel.peer, problem)
            try:
                async with asyncio.timeout(1.0):
                    await channel.send(encode_message(ErrorMessage(code="duplicate_worker", message=problem)))
            except (TimeoutError, ProtocolError):
                pass  # it hears the reason or not; the connection closes either way
            await channel.close(problem)
            return
        session = Session(channel, peer=peer, limits=self._limits, options=self._options)
        if worker is None:
            worker = self.dialled_in[peer.peer_id] = RemoteWorker(f"dial-in:{peer.peer_id}")
        elif worker.connected:
            assert worker.session is not None
            await worker.session.close("replaced by a new connection from the same worker")
        session.start()
        worker.attach(session)
        log.info("worker %r dialled in from %s (%d samples)", peer.peer_id, channel.peer, worker.num_samples)
        await self._notify()
        reason = await session.wait_closed()
        if not self._closing:
            log.warning("dialled-in worker %r left: %s", peer.peer_id, reason)
            worker.last_error = reason
            await self._notify()

    # -- ending ------------------------------------------------------------------------------------------------

    async def close(self, reason: str) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.close(reason) for w in self.all()), return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
