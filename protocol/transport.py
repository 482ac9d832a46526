"""The only module that talks to the ``websockets`` library: dialling, listening, and its errors mapped to ours."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI, WebSocketException

from .channel import ChannelClosed
from .errors import HandshakeFailed
from .limits import Limits

__all__ = ["WebSocketChannel", "dial", "listen", "Listener"]

log = logging.getLogger("fedlink.protocol.transport")

_SUBPROTOCOL = "fedlink.v1"


def _options(limits: Limits) -> dict[str, Any]:
    return {
        "max_size": limits.max_frame_bytes,
        "max_queue": 16,
        "write_limit": 4 * limits.chunk_bytes,
        # Tensor bytes do not compress; deflate would only burn CPU on both sides.
        "compression": None,
        "ping_interval": 20,
        "ping_timeout": 60,
        "close_timeout": 5,
    }


class WebSocketChannel:
    """A :class:`~.channel.Channel` over one websockets connection, either side."""

    def __init__(self, connection: ClientConnection | ServerConnection, peer: str) -> None:
        self._connection = connection
        self.peer = peer

    async def send(self, data: bytes) -> None:
        try:
            await self._connection.send(data)
        except ConnectionClosed as exc:
            raise ChannelClosed(_why(exc)) from exc

    async def recv(self) -> bytes | str:
        try:
            return await self._connection.recv()
        except ConnectionClosed as exc:
            raise ChannelClosed(_why(exc)) from exc

    async def close(self, reason: str = "") -> None:
        # A close frame holds at most 123 bytes of reason (UTF-8); websockets refuses a longer one and then leaves
        # the connection open, so cut by bytes, not characters (dropping a split character).
        await self._connection.close(1000, reason.encode()[:123].decode(errors="ignore"))


def _why(exc: ConnectionClosed) -> str:
    rcvd = exc.rcvd
    if rcvd is None:
        return "connection dropped without a close frame"
    return f"closed with code {rcvd.code}{': ' + rcvd.reason if rcvd.reason else ''}"


async def dial(
    url: str, *, limits: Limits, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> WebSocketChannel:
    """Open a connection to ``url``; every failure becomes :class:`HandshakeFailed` naming the URL."""
    try:
        async with asyncio.timeout(timeout):
            connection = await connect(
                url, subprotocols=[_SUBPROTOCOL], open_timeout=timeout, ssl=ssl_context, **_options(limits)  # type: ignore[list-item]
            )
    except TimeoutError as exc:
        raise HandshakeFailed(f"could not connect to {url} within {timeout:g}s") from exc
    except (OSError, InvalidHandshake, InvalidURI, WebSocketException) as exc:
        raise HandshakeFailed(f"could not connect to {url}: {exc}") from exc
    return WebSocketChannel(connection, peer=url)


class Listener:
    """A listening socket; ``url`` is where it listens (with the real port when 0 was asked for)."""

    def __init__(self, server: Server, scheme: str) -> None:
        self._server = server
        sock = next(iter(server.sockets))
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"

    async def close(self) -> None:
        self._server.close(close_connections=True)
        await self._server.wait_closed()


async def listen(
    handler: Callable[[WebSocketChannel], Awaitable[None]],
    *,
    host: str,
    port: int,
    limits: Limits,
    ssl_context: ssl.SSLContext | None = None,
) -> Listener:
    """Accept connections and call ``handler(channel)`` for each; the connection closes when it returns."""

    async def on_connection(connection: ServerConnection) -> None:
        address = connection.remote_address
        peer = f"{address[0]}:{address[1]}" if address else "unknown peer"
        try:
            await handler(WebSocketChannel(connection, peer=peer))
        except Exception:  # noqa: BLE001 - a failing connection must never stop the listener
            log.exception("connection from %s failed", peer)

    server = await serve(
        on_connection, host, port, subprotocols=[_SUBPROTOCOL], ssl=ssl_context, **_options(limits)  # type: ignore[list-item]
    )
    return Listener(server, "wss" if ssl_context else "ws")
