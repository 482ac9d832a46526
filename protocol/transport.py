"""The only module that talks to the ``websockets`` library: dialling, listening, and its errors mapped to ours.

A listener bounds what strangers can hold: at most ``max_connections`` connections at once, and at most
``limits.max_connections_per_address`` from one address, counted from the TCP accept (a connection still in its
TLS handshake counts); one more is answered ``503`` and closed at once (plain ``ws://``), or closed without a byte
(TLS, whose handshake it never starts). Each opening stage -- the TLS handshake, then the WebSocket upgrade --
gets ``handshake_timeout`` seconds; the caller bounds the fedlink hello that follows with the same figure (see
:func:`~.session.handshake`). So a half-open or slow (slowloris) connection is closed, never kept.

Until the peer has authenticated (:meth:`WebSocketChannel.lift_preauth_limits`, called by the handshake), every
connection takes frames of at most :data:`~.frames.PREAUTH_FRAME_BYTES` and buffers at most
:data:`PREAUTH_WRITE_LIMIT` bytes of its own writes. Whatever the stage, a peer that stops reading cannot make us
buffer its automatic replies (pongs) without bound: once our writes are blocked, more than
:data:`MAX_UNREAD_REPLIES` bytes of replies end the connection.
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

from ..display import safe
from .channel import ChannelClosed
from .errors import HandshakeFailed
from .frames import PREAUTH_FRAME_BYTES
from .limits import Limits
from .tls import peer_role_problem

__all__ = ["WebSocketChannel", "dial", "listen", "Listener", "PREAUTH_WRITE_LIMIT", "MAX_UNREAD_REPLIES"]

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


#: Our write buffer's high-water mark before the peer authenticated: the handshake sends a few small frames.
PREAUTH_WRITE_LIMIT = 16 * 1024
#: Automatic replies (pongs) a connection buffers while the peer does not read them, before it is closed.
MAX_UNREAD_REPLIES = 64 * 1024


def _options(limits: Limits) -> dict[str, Any]:
    return {
        "logger": _WIRE_LOG,
        # Both raised by WebSocketChannel.lift_preauth_limits once the peer has authenticated.
        "max_size": min(PREAUTH_FRAME_BYTES, limits.max_frame_bytes),
        "max_queue": 16,
        "write_limit": PREAUTH_WRITE_LIMIT,
        # Tensor bytes do not compress; deflate would only burn CPU on both sides.
        "compression": None,
        "ping_interval": 20,
        "ping_timeout": 60,
        "close_timeout": 5,
    }


class WebSocketChannel:
    """A :class:`~.channel.Channel` over one websockets connection, either side; starts with the
    pre-authentication limits (see the module's docstring) until :meth:`lift_preauth_limits`."""

    def __init__(self, connection: ClientConnection | ServerConnection, peer: str, *, limits: Limits | None = None) -> None:
        self._connection = connection
        self._limits = limits or Limits()
        self._lifted = False
        self.peer = peer

    def lift_preauth_limits(self) -> None:
        """The session's limits from now on: frames up to ``max_frame_bytes``, writes buffered up to 4 chunks."""
        if self._lifted:
            return
        self._lifted = True
        self._connection.protocol.max_message_size = self._limits.max_frame_bytes
        transport = self._connection.transport
        if transport is not None and not transport.is_closing():
            transport.set_write_buffer_limits(high=4 * self._limits.chunk_bytes)

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
    rcvd, sent = exc.rcvd, exc.sent
    if sent is not None and sent.code == 1009 and (rcvd is None or rcvd.code == 1009):
        return f"closed: the peer sent a frame over our limit ({sent.reason or 'message too big'})"
    if rcvd is None:
        return "connection dropped without a close frame"
    return f"closed with code {rcvd.code}{': ' + safe(rcvd.reason, limit=123) if rcvd.reason else ''}"


class _RepliesBound:
    """Counts what a connection wrote on its own (pongs) while its writes were blocked, and aborts past a bound."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.unread = 0

    def after(self, transport: asyncio.Transport | None, paused: bool, before: int) -> None:
        if transport is None or not paused:
            return
        self.unread += max(0, transport.get_write_buffer_size() - before)
        if self.unread > MAX_UNREAD_REPLIES:
            log.warning(
                "closing the connection of %s: it sends pings but does not read the replies (%d bytes waiting)",
                self.peer, transport.get_write_buffer_size(),
            )
            transport.abort()


class _BoundedClient(ClientConnection):
    """A client connection whose automatic replies to a peer that does not read are bounded."""

    _replies: _RepliesBound | None = None

    def data_received(self, data: bytes) -> None:
        transport = getattr(self, "transport", None)
        before = transport.get_write_buffer_size() if transport is not None else 0
        super().data_received(data)
        if self._replies is None:
            self._replies = _RepliesBound("the peer")
        self._replies.after(transport, self.paused, before)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._replies is not None:
            self._replies.unread = 0


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
                url, subprotocols=[_SUBPROTOCOL], open_timeout=timeout, ssl=ssl_context,  # type: ignore[list-item]
                create_connection=_BoundedClient, **_options(limits),
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
    problem = peer_role_problem(ssl_context, _peer_certificate(connection.transport))
    if problem is not None:
        await connection.close(1008, "wrong certificate role")
        raise HandshakeFailed(f"could not connect to {url}: {problem}")
    return WebSocketChannel(connection, peer=url, limits=limits)


def _peer_certificate(transport: asyncio.BaseTransport | None) -> bytes | None:
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der if isinstance(der, bytes) else None


def _hint(url: str, exc: Exception) -> str:
    """What a failed opening most likely means, for the failures whose own message does not say."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code == 503:
        return " (the peer holds as many connections as it accepts; try again later)"
    if isinstance(exc, ConnectionRefusedError):
        return ""  # nothing listens there: the message says so
    closed = isinstance(exc, (InvalidMessage, ConnectionError, EOFError))
    if url.startswith("ws://") and closed:
        return " (if the peer requires TLS, dial wss://)"
    if url.startswith("wss://") and isinstance(exc, ConnectionError):
        return _BROKE_DURING_TLS
    if url.startswith("wss://") and closed:
        # With TLS 1.3 a listener checks the client certificate after the handshake, so a refusal looks like this.
        return (
            " (the peer closed the TLS connection before answering: it may require a client certificate we did not"
            " present -- config tls.cert and tls.key, fl-worker --tls-cert and --tls-key -- or not trust ours)"
        )
    return ""


_BROKE_DURING_TLS = (
    " (the connection broke during TLS: is the peer listening without TLS? then dial ws://; or it holds as many "
    "connections as it accepts: try again later)"
)


def _tls_hint(exc: ssl.SSLError) -> str:
    reason = str(exc.reason or exc).upper()
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
        return _BROKE_DURING_TLS.replace(" (", "; ", 1).rstrip(")")
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
        """Connections held now, counted from the TCP accept (those still in their TLS handshake included)."""
        return self._gate.open

    @property
    def refused_connections(self) -> int:
        """Connections closed at once because ``max_connections`` (or the per-address cap) were already open."""
        return self._gate.refused

    async def close(self) -> None:
        self._server.close(close_connections=True)
        for task in list(self._gate.tasks):
            task.cancel()
        await asyncio.gather(*self._gate.tasks, return_exceptions=True)
        await self._server.wait_closed()


class _Gate:
    """Counts a listener's connections, in all and per address; says no to one more than a limit, and logs that
    at most every 10 s per limit."""

    def __init__(self, limit: int, per_address: int | None, where: str) -> None:
        self.limit = limit
        self.per_address = per_address
        self.where = where
        self.open = 0
        self.refused = 0
        self.by_address: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def admit(self, address: str, peer: str) -> bool:
        held = self.by_address.get(address, 0)
        if self.open < self.limit and (self.per_address is None or held < self.per_address):
            self.open += 1
            self.by_address[address] = held + 1
            return True
        self.refused += 1
        if self.open >= self.limit:
            self._log("max_connections", peer, f"{self.open} open, the limit is {self.limit} (max_connections)")
        else:
            self._log(
                "per_address", peer,
                f"{held} open from {address}, the limit per address is {self.per_address} (max_connections_per_address)",
            )
        return False

    def release(self, address: str) -> None:
        self.open -= 1
        held = self.by_address.get(address, 0) - 1
        if held > 0:
            self.by_address[address] = held
        else:
            self.by_address.pop(address, None)

    def _log(self, key: str, peer: str, why: str) -> None:
        self._unlogged[key] = self._unlogged.get(key, 0) + 1
        now = asyncio.get_running_loop().time()
        if now - self._logged_at.get(key, -1e9) >= 10.0:  # a flood must not become a flood of log lines
            log.warning("refused %d connection(s) on %s (last from %s): %s", self._unlogged[key], self.where, peer, why)
            self._logged_at[key], self._unlogged[key] = now, 0

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _capped(gate: _Gate, tls: ssl.SSLContext | None, tls_timeout: float) -> type[ServerConnection]:
    """A ServerConnection that takes a place in ``gate`` at the TCP accept and frees it when the connection is
    lost; with ``tls``, it does the TLS handshake itself (``loop.start_tls``) so that a connection stalled in it
    holds its place, and one refused never costs a TLS handshake."""

    class CappedConnection(ServerConnection):
        _stage = "new"  # -> "refused" | "tls" -> "open" -> "done"
        _address = ""
        _peer = "unknown peer"
        _early: list[bytes] | None = None
        _early_eof = False
        _early_paused = False
        _replies: _RepliesBound | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            address = transport.get_extra_info("peername")
            if isinstance(address, tuple):
                self._address, self._peer = str(address[0]), f"{address[0]}:{address[1]}"
            if not gate.admit(self._address, self._peer):
                self._stage = "refused"
                assert isinstance(transport, asyncio.WriteTransport)
                if tls is None:
                    transport.write(_BUSY)
                transport.close()
                return
            self._replies = _RepliesBound(self._peer)
            if tls is None:
                self._open(transport)
                return
            self._stage, self._early = "tls", []
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # the ClientHello waits in the kernel until start_tls reads it
            gate.spawn(self._start_tls(transport))

        async def _start_tls(self, raw: asyncio.Transport) -> None:
            assert tls is not None
            loop = asyncio.get_running_loop()
            try:
                secured = await loop.start_tls(raw, self, tls, server_side=True, ssl_handshake_timeout=tls_timeout)
            except asyncio.CancelledError:
                raw.abort()
                self._release()
                raise
            except Exception as exc:  # noqa: BLE001 - any failed TLS handshake ends this connection only
                log.debug("TLS handshake from %s failed: %s", self._peer, safe(exc, limit=200))
                raw.abort()
                self._release()
                return
            if self._stage != "tls" or secured is None:  # lost between the handshake and now
                self._release()
                return
            self._open(secured)

        def _open(self, transport: asyncio.BaseTransport) -> None:
            self._stage = "open"
            super().connection_made(transport)
            if self._early_paused:
                super().pause_writing()
            for chunk in self._early or ():
                self.data_received(chunk)
            if self._early_eof:
                super().eof_received()
            self._early = None

        def _release(self) -> None:
            if self._stage in ("tls", "open"):
                gate.release(self._address)
            self._stage = "done"

        def connection_lost(self, exc: Exception | None) -> None:
            opened = self._stage == "open"
            self._release()
            if opened:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._stage == "tls" and self._early is not None:
                self._early.append(data)  # decrypted bytes that came before _open
            elif self._stage == "open":
                transport = self.transport
                before = transport.get_write_buffer_size()
                super().data_received(data)
                if self._replies is not None:
                    self._replies.after(transport, self.paused, before)

        def eof_received(self) -> None:
            if self._stage == "tls":
                self._early_eof = True
            elif self._stage == "open":
                super().eof_received()

        def pause_writing(self) -> None:
            if self._stage == "open":
                super().pause_writing()
            else:
                self._early_paused = True

        def resume_writing(self) -> None:
            if self._stage == "open":
                super().resume_writing()
                if self._replies is not None:
                    self._replies.unread = 0
            else:
                self._early_paused = False

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

    At most ``max_connections`` at once, and ``limits.max_connections_per_address`` from one address, counted from
    the TCP accept; each opening stage (TLS, WebSocket upgrade) must finish within ``handshake_timeout`` seconds,
    and ``handler`` should bound the fedlink handshake by the same figure. A client certificate whose role the
    ``ssl_context`` does not accept (see :func:`~.tls.peer_role_problem`) is refused before ``handler`` runs.
    """
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")

    async def on_connection(connection: ServerConnection) -> None:
        address = connection.remote_address
        peer = f"{address[0]}:{address[1]}" if address else "unknown peer"
        problem = peer_role_problem(ssl_context, _peer_certificate(connection.transport))
        if problem is not None:
            log.warning("refused connection from %s: %s", peer, problem)
            await connection.close(1008, "wrong certificate role")
            return
        try:
            await handler(WebSocketChannel(connection, peer=peer, limits=limits))
        except Exception:  # noqa: BLE001 - a failing connection must never stop the listener
            log.exception("connection from %s failed", peer)

    gate = _Gate(max_connections, limits.max_connections_per_address, f"{host}:{port}")
    server = await serve(
        on_connection,
        host,
        port,
        subprotocols=[_SUBPROTOCOL],  # type: ignore[list-item]
        # TLS is done by each connection itself (see _capped), so that it is counted from the TCP accept.
        ssl=None,
        open_timeout=handshake_timeout,
        create_connection=_capped(gate, ssl_context, handshake_timeout),
        **_options(limits),
    )
    listener = Listener(server, "wss" if ssl_context else "ws", gate)
    gate.where = listener.url
    return listener
