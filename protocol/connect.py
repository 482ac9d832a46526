"""Opening a session: the one path every connection takes, whoever dialled and whatever carries it.

Coordinators dialling workers, workers dialling in to a coordinator, and in-memory workers in tests and
simulations all go through :func:`open_session`: the hello exchange and authentication (:func:`.session.handshake`),
the caller's admission check on the peer's hello (e.g. "this worker id is already connected"), then the session's
start. A refusal at admission is told to the peer as an ``error`` message before the connection closes, so both
sides report the same reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .auth import Keyring
from .channel import Channel, ChannelClosed
from .errors import HandshakeFailed, ProtocolError
from .frames import encode_message
from .limits import Limits
from .messages import ErrorMessage, Hello
from .session import RequestHandler, Session, SessionOptions, handshake

__all__ = ["Refused", "open_session"]


class Refused(HandshakeFailed):
    """The peer completed the handshake but was not admitted (duplicate id, wrong role)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.refusal = code


async def open_session(
    channel: Channel,
    hello: Hello,
    *,
    limits: Limits,
    timeout: float,
    initiator: bool,
    keyring: Keyring | None = None,
    options: SessionOptions | None = None,
    handler: RequestHandler | None = None,
    admit: Callable[[Hello], None] | None = None,
    start: bool = True,
) -> Session:
    """Handshake on ``channel``, check the peer with ``admit`` (which raises :class:`Refused`), start a session.

    On any failure the channel is closed and a :class:`~.errors.ProtocolError` raised; nothing is left open.
    """
    try:
        peer = await handshake(channel, hello, limits=limits, timeout=timeout, keyring=keyring, initiator=initiator)
        if admit is not None:
            admit(peer)
    except Refused as exc:
        await _tell(channel, ErrorMessage(code=exc.refusal, message=str(exc)[:4096]))
        await channel.close(str(exc))
        raise
    except ProtocolError as exc:
        await channel.close(str(exc))
        raise
    session = Session(channel, peer=peer, limits=limits, handler=handler, options=options)
    if start:
        session.start()
    return session


async def _tell(channel: Channel, message: ErrorMessage) -> None:
    try:
        async with asyncio.timeout(1.0):
            await channel.send(encode_message(message))
    except (TimeoutError, ChannelClosed, ProtocolError):
        pass  # the peer hears the reason or not; the connection closes either way
