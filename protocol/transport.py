"""The only module that talks to the ``websockets`` library: dialling, listening, and its errors mapped to ours.

A listener bounds what strangers can hold: at most ``max_connections`` connections at once (one more is answered
``503`` and closed at once), and ``handshake_timeout`` seconds for each opening stage -- the TLS handshake, then the
WebSocket upgrade; the caller bounds the fedlink hello that follows with the same figure (see
:func:`~.session.handshake`). So a half-open or slow (slowloris) connection is closed, never kept.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)

from .channel import ChannelClosed
from .errors import HandshakeFailed
from .limits import Limits

__all__ = ["WebSocketChannel", "dial", "listen", "Listener"]

log = logging.getLogger("fedlink.protocol.transport")

_SUBPROTOCOL = "fedlink.v1"

# websockets logs every frame at DEBUG level, with the first bytes of its payload: tensor bytes, for data frames.
# Logs must never hold tensor contents, so its logger stays at INFO whatever the root logger's level.
_WIRE_LOG = logging.getLogger("fedlink.protocol.wire")
_WIRE_LOG.setLevel(logging.INFO)

# The answer to a connection over a listener's cap, written before any byte is read: a dialler sees a clear
# "HTTP 503" instead of a reset.
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n"
    b"Connection: close\r\n\r\ntoo many connections; try later\n"
)


def _options(limits: Limits) -> dict[str, Any]:
    return {
        "logger": _WIRE_LOG,
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
    """Open a connection to ``url``; every failure becomes :class:`HandshakeFailed` naming the URL and the fix.

    ``ssl_context`` is for ``wss://`` URLs only (None: the system's CAs); a ``ws://`` URL with one is refused,
    so that a configured TLS setup can never silently fall back to plain text.
    """
    if ssl_context is not None and not url.startswith("wss://"):
        raise HandshakeFailed(f"refusing to dial {url} in plain text: TLS is configured, use wss://")
    try:
        async with asyncio.timeout(timeout):
            connection = await connect(
                url, subprotocols=[_SUBPROTOCOL], open_timeout=timeout, ssl=ssl_context, **_options(limits)  # type: ignore[list-item]
            )
    except TimeoutError as exc:
        raise HandshakeFailed(f"could not connect to {url} within {timeout:g}s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise HandshakeFailed(
            f"could not connect to {url}: its TLS certificate is not trusted ({exc.verify_message or exc.reason}); "
            "give the CA that signed it (config tls.ca, fl-worker --tls-ca) and dial a name the certificate lists"
        ) from exc
    except ssl.SSLError as exc:
        raise HandshakeFailed(f"could not connect to {url}: TLS failed ({exc.reason or exc}){_tls_hint(exc)}") from exc
    except (OSError, InvalidHandshake, InvalidURI, WebSocketException) as exc:
        raise HandshakeFailed(f"could not connect to {url}: {str(exc) or type(exc).__name__}{_hint(url, exc)}") from exc
    return WebSocketChannel(connection, peer=url)


def _hint(url: str, exc: Exception) -> str:
    """What a failed opening most likely means, for the failures whose own message does not say."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code == 503:
        return " (the peer holds as many connections as it accepts; try again later)"
    closed = isinstance(exc, (InvalidMessage, ConnectionError, EOFError))
    if url.startswith("ws://") and closed:
        return " (if the peer requires TLS, dial wss://)"
    if url.startswith("wss://") and isinstance(exc, ConnectionError):
        return " (the connection broke during TLS: is the peer listening without TLS? then dial ws://)"
    if url.startswith("wss://") and closed:
        # With TLS 1.3 a listener checks the client certificate after the handshake, so a refusal looks like this.
        return (
            " (the peer closed the TLS connection before answering: it may require a client certificate we did not"
            " present -- config tls.cert and tls.key, fl-worker --tls-cert and --tls-key -- or not trust ours)"
        )
    return ""


def _tls_hint(exc: ssl.SSLError) -> str:
    reason = str(exc.reason or exc).upper()
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return "; the peer requires a client certificate (config tls.cert and tls.key, fl-worker --tls-cert and --tls-key)"
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        return "; the peer does not trust our client certificate (is it signed by the CA the peer was given?)"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
        return "; is the peer listening without TLS? then dial ws://"
    return ""


class Listener:
    """A listening socket; ``url`` is where it listens (with the real port when 0 was asked for)."""

    def __init__(self, server: Server, scheme: str, gate: "_Gate") -> None:
        self._server = server
        self._gate = gate
        sock = next(iter(server.sockets))
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"

    @property
    def open_connections(self) -> int:
        """Connections held now (TLS connections count once their TLS handshake is done)."""
        return self._gate.open

    @property
    def refused_connections(self) -> int:
        """Connections closed at once because ``max_connections`` were already open."""
        return self._gate.refused

    async def close(self) -> None:
        self._server.close(close_connections=True)
        await self._server.wait_closed()


class _Gate:
    """Counts a listener's connections; says no to one more than ``limit``, and logs that at most every 10 s."""

    def __init__(self, limit: int, where: str) -> None:
        self.limit = limit
        self.where = where
        self.open = 0
        self.refused = 0
        self._logged_at = -1e9
        self._unlogged = 0

    def admit(self, peer: str) -> bool:
        if self.open < self.limit:
            self.open += 1
            return True
        self.refused += 1
        self._unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged_at >= 10.0:  # a flood must not become a flood of log lines
            log.warning(
                "refused %d connection(s) on %s (last from %s): %d open, the limit is %d (max_connections)",
                self._unlogged, self.where, peer, self.open, self.limit,
            )
            self._logged_at, self._unlogged = now, 0
        return False


def _capped(gate: _Gate) -> type[ServerConnection]:
    """A ServerConnection that takes a place in ``gate`` when it is made, and frees it when it is lost."""

    class CappedConnection(ServerConnection):
        _refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            address = transport.get_extra_info("peername")
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unknown peer"
            if not gate.admit(peer):
                self._refused = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(_BUSY)
                transport.close()
                return
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            gate.open -= 1
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def eof_received(self) -> None:
            if not self._refused:
                super().eof_received()

    return CappedConnection


async def listen(
    handler: Callable[[WebSocketChannel], Awaitable[None]],
    *,
    host: str,
    port: int,
    limits: Limits,
    ssl_context: ssl.SSLContext | None = None,
    max_connections: int = 64,
    handshake_timeout: float = 10.0,
) -> Listener:
    """Accept connections and call ``handler(channel)`` for each; the connection closes when it returns.

    At most ``max_connections`` at once; each opening stage (TLS, WebSocket upgrade) must finish within
    ``handshake_timeout`` seconds, and ``handler`` should bound the fedlink handshake by the same figure.
    """
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")

    async def on_connection(connection: ServerConnection) -> None:
        address = connection.remote_address
        peer = f"{address[0]}:{address[1]}" if address else "unknown peer"
        try:
            await handler(WebSocketChannel(connection, peer=peer))
        except Exception:  # noqa: BLE001 - a failing connection must never stop the listener
            log.exception("connection from %s failed", peer)

    gate = _Gate(max_connections, f"{host}:{port}")
    server = await serve(
        on_connection,
        host,
        port,
        subprotocols=[_SUBPROTOCOL],  # type: ignore[list-item]
        ssl=ssl_context,
        open_timeout=handshake_timeout,
        create_connection=_capped(gate),
        **_options(limits),
    )
    listener = Listener(server, "wss" if ssl_context else "ws", gate)
    gate.where = listener.url
    return listener
