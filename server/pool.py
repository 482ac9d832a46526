"""The coordinator's workers and their connections, kept alive for the whole run.

Workers listed in the config are dialled, and re-dialled with backoff whenever their connection drops
(:func:`fedlink.backoff.keep_connected`, the same loop a dialling-out worker runs), so a worker that restarts is
re-admitted on its own. Workers behind NAT dial in to the coordinator's listener instead (``fl-worker --connect``).
Every connection opens through :func:`fedlink.protocol.connect.open_session`.

A worker is its hello id everywhere, whichever side dialled. Ids are unique among live connections: a second
connection claiming an id that is already connected is refused, and both sides are told why. The one exception is
a dial-in worker that proves its *own* token (``auth.workers``): it may replace its earlier session, since only
that worker holds the token (a worker reconnecting after a network cut would otherwise wait for the old session's
heartbeat timeout).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from typing import Protocol

from fedlink.backoff import Backoff, keep_connected
from fedlink.protocol.auth import Keyring
from fedlink.protocol.channel import Channel
from fedlink.protocol.connect import Refused, open_session
from fedlink.protocol.errors import AuthenticationFailed, ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.session import SessionOptions
from fedlink.protocol.transport import Listener, listen

from .errors import NotEnoughWorkers
from .remote import RemoteWorker

__all__ = ["WorkerPool", "PoolObserver"]

log = logging.getLogger("fedlink.server")


class PoolObserver(Protocol):
    def worker_connected(self, worker: str) -> None: ...

    def worker_disconnected(self, worker: str, reason: str) -> None: ...

    def connection_refused(self, peer: str, reason: str, *, auth: bool = False) -> None: ...


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
        observer: PoolObserver | None = None,
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
        # Dial-in ids checked against a token of their own (auth.workers): only they may replace a live session.
        self._own_tokens = frozenset(listen_keyring.per_peer) if listen_keyring is not None else frozenset()
        self.observer = observer
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: Listener | None = None
        self._stop = asyncio.Event()

    # -- membership --------------------------------------------------------------------------------------------

    def all(self) -> list[RemoteWorker]:
        """Configured workers in config order, then dialled-in workers by id: the fixed order of every round."""
        return self.configured + [self.dialled_in[k] for k in sorted(self.dialled_in)]

    def connected(self) -> list[RemoteWorker]:
        return [w for w in self.all() if w.connected]

    def connected_count(self) -> int:
        """``len(self.connected())`` without building and sorting the list: it is checked on every connection."""
        return sum(1 for w in self.configured if w.connected) + sum(1 for w in self.dialled_in.values() if w.connected)

    def live(self, worker_id: str) -> RemoteWorker | None:
        """The connected worker using ``worker_id``, if any.

        A dialled-in worker is found by its key (its id), not by a scan: this runs for every connection, and a
        scan made a thousand workers dialling in cost a million checks.
        """
        configured = next((w for w in self.configured if w.connected and w.name == worker_id), None)
        if configured is not None:
            return configured
        dialled = self.dialled_in.get(worker_id)
        return dialled if dialled is not None and dialled.connected and dialled.name == worker_id else None

    def _refuse_duplicate(self, peer: Hello, *, newcomer: RemoteWorker | None) -> None:
        holder = self.live(peer.peer_id)
        if holder is not None and holder is not newcomer:
            where = holder.url if not holder.url.startswith("dial-in:") else "a dial-in connection"
            raise Refused(
                "duplicate_worker",
                f"worker id {peer.peer_id!r} is already connected ({where}); every worker needs its own id "
                "(fl-worker --id NAME)",
            )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _connected(self, worker: RemoteWorker) -> None:
        if self.observer is not None:
            self.observer.worker_connected(worker.name)

    def _disconnected(self, worker: RemoteWorker, reason: str) -> None:
        if self.observer is not None:
            self.observer.worker_disconnected(worker.name, reason)

    async def wait_for(self, count: int, *, timeout: float) -> list[RemoteWorker]:
        """Wait until ``count`` workers are connected; raise NotEnoughWorkers naming the missing ones if not."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: self.connected_count() >= count)
        except TimeoutError:
            missing = "; ".join(f"{w.url}: {w.last_error or 'not connected'}" for w in self.all() if not w.connected)
            raise NotEnoughWorkers(
                f"{len(self.connected())} workers reachable after waiting {timeout:g}s, "
                f"sampling.min_workers is {count}" + (f" ({missing})" if missing else "")
            ) from None
        return self.connected()

    async def changed(self) -> None:
        """Return at the next change of membership (a worker connected or left)."""
        async with self._changed:
            await self._changed.wait()

    # -- dialling out ------------------------------------------------------------------------------------------

    async def _connect(self, worker: RemoteWorker) -> bool:
        ok = await worker.connect(
            hello=self._hello, limits=self._limits, timeout=self._connect_timeout, options=self._options,
            admit=lambda peer: self._refuse_duplicate(peer, newcomer=worker),
        )
        if not ok and isinstance(worker.last_exception, AuthenticationFailed) and self.observer is not None:
            self.observer.connection_refused(worker.url, worker.last_error, auth=True)
        return ok

    async def start(self) -> None:
        """Dial every configured ``ws://``/``wss://`` worker once, together, then keep each connected.

        The first attempt is awaited, so the first round sees every worker that was reachable at the start.
        """
        dialled = [w for w in self.configured if w.url.startswith(("ws://", "wss://"))]
        first = await asyncio.gather(*(self._connect(w) for w in dialled))
        for worker, ok in zip(dialled, first):
            if ok:
                self._connected(worker)
            self._tasks.append(asyncio.ensure_future(self._keep_connected(worker, connected=ok)))

    async def _keep_connected(self, worker: RemoteWorker, *, connected: bool) -> None:
        backoff = Backoff(cap=self._backoff_cap)
        already = connected

        async def serve_once() -> bool:
            nonlocal already
            if already:
                already = False
            elif not await self._connect(worker):
                if backoff.attempt == 0:
                    log.warning("cannot reach worker %s: %s; retrying", worker.url, worker.last_error)
                return False
            else:
                self._connected(worker)
            await self._notify()
            assert worker.session is not None
            reason = await worker.session.wait_closed()
            if self._stop.is_set():
                return True
            worker.last_error = reason
            log.warning("lost worker %r (%s): %s; reconnecting", worker.name, worker.url, reason)
            self._disconnected(worker, reason)
            await self._notify()
            return True

        await keep_connected(serve_once, stop=self._stop, backoff=backoff, redial_at_once=True)

    # -- dialling in -------------------------------------------------------------------------------------------

    async def listen(self, *, host: str, port: int) -> str:
        self._listener = await listen(
            self._accept, host=host, port=port, limits=self._limits, ssl_context=self._listen_ssl,
            max_connections=self._max_connections, handshake_timeout=self._connect_timeout,
        )
        log.info("listening for workers on %s", self._listener.url)
        return self._listener.url

    def _admit_dial_in(self, peer: Hello) -> None:
        if peer.role != "worker":
            raise Refused("not_a_worker", "only workers may dial in to a coordinator")
        existing = self.dialled_in.get(peer.peer_id)
        if existing is not None and existing.connected and peer.peer_id in self._own_tokens:
            return  # proved its own token: it may replace its earlier session (see the module docstring)
        self._refuse_duplicate(peer, newcomer=None)

    async def _accept(self, channel: Channel) -> None:
        try:
            session = await open_session(
                channel, self._hello, limits=self._limits, timeout=self._connect_timeout,
                keyring=self._listen_keyring, initiator=False, options=self._options, admit=self._admit_dial_in,
                start=False,
            )
        except ProtocolError as exc:
            log.warning("refused connection from %s: %s", channel.peer, exc)
            if self.observer is not None:
                self.observer.connection_refused(channel.peer, str(exc), auth=isinstance(exc, AuthenticationFailed))
            return
        peer = session.peer_hello
        worker = self.dialled_in.get(peer.peer_id)
        if worker is None:
            worker = self.dialled_in[peer.peer_id] = RemoteWorker(f"dial-in:{peer.peer_id}")
        elif worker.connected:
            assert worker.session is not None
            await worker.session.close("replaced by a new connection from the same worker")
        session.start()
        worker.attach(session)
        log.info("worker %r dialled in from %s (%d samples)", peer.peer_id, channel.peer, worker.num_samples)
        self._connected(worker)
        await self._notify()
        reason = await session.wait_closed()
        if not self._stop.is_set():
            log.warning("dialled-in worker %r left: %s", peer.peer_id, reason)
            worker.last_error = reason
            if worker.session is session:
                self._disconnected(worker, reason)
            await self._notify()

    # -- ending ------------------------------------------------------------------------------------------------

    async def close(self, reason: str) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.close(reason) for w in self.all()), return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
