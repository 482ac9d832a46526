"""A channel moves whole binary messages between two peers; the session layer needs nothing more.

:class:`WebSocketChannel` (in :mod:`.transport`) is the real one; :func:`memory_pair` joins two sessions in one
process, for tests and simulations without sockets.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

from .errors import SessionClosed

__all__ = ["Channel", "ChannelClosed", "PreauthLimited", "memory_pair", "MemoryChannel"]


class ChannelClosed(SessionClosed):
    """The underlying connection is gone."""


class Channel(Protocol):
    peer: str

    async def send(self, data: bytes) -> None:
        """Send one message; waits while the peer is slow to read (backpressure). Raises ChannelClosed."""

    async def recv(self) -> bytes | str:
        """The next whole message. Raises ChannelClosed when the connection ends."""

    async def close(self, reason: str = "") -> None:
        """Close; idempotent."""


@runtime_checkable
class PreauthLimited(Protocol):
    """A channel that starts with the small limits of a stranger (frame size, write buffer) until told that the
    peer authenticated; :func:`~.session.handshake` tells it at the one moment no larger frame can be in flight."""

    def lift_preauth_limits(self) -> None:
        """Raise the limits to the session's; idempotent."""


class MemoryChannel:
    """One end of an in-process channel; the bounded queues give the backpressure a socket would.

    Closing either end closes both, as a dropped connection does.
    """

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes], closed: asyncio.Event, peer: str):
        self._inbox = inbox
        self._outbox = outbox
        self._closed = closed
        self.peer = peer

    async def _until_closed(self, operation: "asyncio.Future[object] | asyncio.Task[object]") -> object:
        closer = asyncio.ensure_future(self._closed.wait())
        waiters: set[asyncio.Future[Any]] = {operation, closer}
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
        if operation in done:
            return operation.result()
        operation.cancel()
        raise ChannelClosed(f"channel to {self.peer} is closed")

    async def send(self, data: bytes) -> None:
        if self._closed.is_set():
            raise ChannelClosed(f"channel to {self.peer} is closed")
        await self._until_closed(asyncio.ensure_future(self._outbox.put(bytes(data))))

    async def recv(self) -> bytes | str:
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        if self._closed.is_set():
            raise ChannelClosed(f"channel to {self.peer} is closed")
        item = await self._until_closed(asyncio.ensure_future(self._inbox.get()))
        assert isinstance(item, bytes)
        return item

    async def close(self, reason: str = "") -> None:
        self._closed.set()


def memory_pair(a: str = "a", b: str = "b", *, maxsize: int = 64) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends: what one sends, the other receives."""
    q1: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
    q2: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
    closed = asyncio.Event()
    return MemoryChannel(q1, q2, closed, peer=b), MemoryChannel(q2, q1, closed, peer=a)
