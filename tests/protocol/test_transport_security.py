"""Real sockets on 127.0.0.1: TLS and mutual TLS, the connection cap, the per-connection handshake time limit, and
logs that never show frame contents."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fedlink.protocol.errors import HandshakeFailed
from fedlink.protocol.frames import encode_data
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.session import handshake
from fedlink.protocol.tls import client_context, server_context
from fedlink.protocol.transport import Listener, WebSocketChannel, dial, listen
from fedlink.server.certs import Machine, write_certs

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits()
COORDINATOR = Hello(role="coordinator", peer_id="c1")
WORKER = Hello(role="worker", peer_id="w1")
WAIT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    write_certs(out, hosts=[Machine(("w1", "127.0.0.1"))], coordinator=Machine(("localhost",)))
    return out


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA issuing the same names: a stranger's certificates."""
    out = tmp_path_factory.mktemp("other-pki")
    write_certs(out, hosts=[Machine(("w1", "127.0.0.1"))], coordinator=Machine(("localhost",)))
    return out


@asynccontextmanager
async def worker_listening(
    ssl_context: ssl.SSLContext | None = None, *, max_connections: int = 64, handshake_timeout: float = 10.0
) -> AsyncIterator[Listener]:
    """A listener that does the worker's side of the handshake and then holds the connection until it closes."""

    async def on_channel(channel: WebSocketChannel) -> None:
        await handshake(channel, WORKER, limits=LIMITS, timeout=handshake_timeout)
        try:
            await channel.recv()
        except Exception:  # noqa: BLE001 - the client went away; that ends this connection
            pass

    listener = await listen(
        on_channel, host="127.0.0.1", port=0, limits=LIMITS, ssl_context=ssl_context,
        max_connections=max_connections, handshake_timeout=handshake_timeout,
    )
    try:
        yield listener
    finally:
        await listener.close()


async def _connect(url: str, ssl_context: ssl.SSLContext | None = None) -> Hello:
    channel = await dial(url, limits=LIMITS, timeout=WAIT, ssl_context=ssl_context)
    try:
        return await handshake(channel, COORDINATOR, limits=LIMITS, timeout=WAIT)
    finally:
        await channel.close("done")


def _server(pki: Path, *, mutual: bool = False) -> ssl.SSLContext:
    return server_context(
        cert=pki / "w1" / "cert.pem", key=pki / "w1" / "key.pem", client_ca=pki / "w1" / "ca.pem" if mutual else None
    )


async def test_tls_with_the_right_ca(pki: Path) -> None:
    async with worker_listening(_server(pki)) as listener:
        assert listener.url.startswith("wss://127.0.0.1:")
        assert await _connect(listener.url, client_context(ca=pki / "coordinator" / "ca.pem")) == WORKER


async def test_plain_ws_to_a_tls_listener_is_refused(pki: Path) -> None:
    async with worker_listening(_server(pki)) as listener:
        with pytest.raises(HandshakeFailed, match="dial wss://"):
            await _connect(listener.url.replace("wss://", "ws://"))
        assert await _connect(listener.url, client_context(ca=pki / "ca" / "ca.pem")) == WORKER, "it still serves"


async def test_a_certificate_from_another_ca_is_refused(pki: Path, other_pki: Path) -> None:
    async with worker_listening(_server(other_pki)) as listener:
        with pytest.raises(HandshakeFailed, match="not trusted.*tls.ca"):
            await _connect(listener.url, client_context(ca=pki / "coordinator" / "ca.pem"))


async def test_a_name_the_certificate_does_not_list_is_refused(pki: Path) -> None:
    async with worker_listening(_server(pki)) as listener:
        url = listener.url.replace("127.0.0.1", "localhost")  # the certificate names w1 and 127.0.0.1 only
        with pytest.raises(HandshakeFailed, match="not trusted"):
            await _connect(url, client_context(ca=pki / "ca" / "ca.pem"))


async def test_tls_dial_to_a_plain_listener_fails_with_a_hint(pki: Path) -> None:
    async with worker_listening() as listener:
        with pytest.raises(HandshakeFailed, match="listening without TLS"):
            await _connect(listener.url.replace("ws://", "wss://"), client_context(ca=pki / "ca" / "ca.pem"))


async def test_configured_tls_never_falls_back_to_plain_text(pki: Path) -> None:
    async with worker_listening() as listener:
        with pytest.raises(HandshakeFailed, match="refusing to dial .* in plain text"):
            await _connect(listener.url, client_context(ca=pki / "ca" / "ca.pem"))


async def test_mutual_tls(pki: Path, other_pki: Path) -> None:
    async with worker_listening(_server(pki, mutual=True)) as listener:
        with pytest.raises(HandshakeFailed, match="require a client certificate"):
            await _connect(listener.url, client_context(ca=pki / "coordinator" / "ca.pem"))
        stranger = client_context(
            ca=pki / "coordinator" / "ca.pem", cert=other_pki / "coordinator" / "cert.pem",
            key=other_pki / "coordinator" / "key.pem",
        )
        with pytest.raises(HandshakeFailed):
            await _connect(listener.url, stranger)
        ours = client_context(
            ca=pki / "coordinator" / "ca.pem", cert=pki / "coordinator" / "cert.pem", key=pki / "coordinator" / "key.pem"
        )
        assert await _connect(listener.url, ours) == WORKER


def _tcp(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


async def _closed_by_peer(sock: socket.socket) -> float:
    """Seconds until the listener closes ``sock`` (reads until EOF, discarding what it sent)."""
    started = time.monotonic()

    def wait() -> None:
        while sock.recv(4096):
            pass

    await asyncio.to_thread(wait)
    return time.monotonic() - started


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_connection_cap_refuses_one_more_with_503(pki: Path, tls: bool) -> None:
    context = _server(pki) if tls else None
    client = client_context(ca=pki / "ca" / "ca.pem") if tls else None
    async with worker_listening(context, max_connections=2) as listener:
        first = await dial(listener.url, limits=LIMITS, timeout=WAIT, ssl_context=client)
        second = await dial(listener.url, limits=LIMITS, timeout=WAIT, ssl_context=client)
        # Over TLS the refusal comes before the TLS handshake (which it never pays for): no room for an HTTP answer.
        with pytest.raises(HandshakeFailed, match="as many connections as it accepts" if tls else "503"):
            await dial(listener.url, limits=LIMITS, timeout=WAIT, ssl_context=client)
        assert listener.open_connections == 2 and listener.refused_connections == 1
        await first.close()
        for _ in range(100):  # the listener frees the place once it sees the close
            if listener.open_connections < 2:
                break
            await asyncio.sleep(0.05)
        assert await _connect(listener.url, client) == WORKER
        await second.close()


async def test_a_silent_tcp_connection_is_closed_after_the_handshake_time(pki: Path) -> None:
    async with worker_listening(handshake_timeout=0.5) as listener:
        with _tcp(listener.port) as sock:
            assert 0.3 < await _closed_by_peer(sock) < 5
    async with worker_listening(_server(pki), handshake_timeout=0.5) as listener:
        with _tcp(listener.port) as sock:  # never starts TLS
            assert 0.3 < await _closed_by_peer(sock) < 5


async def test_a_slowloris_upgrade_is_closed_after_the_handshake_time() -> None:
    async with worker_listening(handshake_timeout=0.8) as listener:
        with _tcp(listener.port) as sock:
            started = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            closed = False
            for _ in range(40):  # one header line every 0.1 s, never the end of the request
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                await asyncio.sleep(0.1)
                if (await asyncio.to_thread(_peek_closed, sock)):
                    closed = True
                    break
            assert closed and time.monotonic() - started < 3


def _peek_closed(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(4096, socket.MSG_PEEK) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(WAIT)


async def test_an_upgraded_connection_without_a_hello_is_closed() -> None:
    async with worker_listening(handshake_timeout=0.5) as listener:
        channel = await dial(listener.url, limits=LIMITS, timeout=WAIT)
        started = time.monotonic()
        with pytest.raises(Exception) as ended:
            while True:  # the worker's hello, then the end
                await channel.recv()
        assert "closed" in str(ended.value) and time.monotonic() - started < 5


async def test_frame_contents_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    """websockets logs frames at DEBUG, with their first bytes: the transport keeps that logger at INFO."""
    payload = bytes.fromhex("deadbeefcafebabe") * 8
    with caplog.at_level(logging.DEBUG):
        async with worker_listening() as listener:
            channel = await dial(listener.url, limits=LIMITS, timeout=WAIT)
            await handshake(channel, COORDINATOR, limits=LIMITS, timeout=WAIT)
            await channel.send(encode_data(1, 0, payload))
            await channel.close("done")
    text = caplog.text.lower()
    assert "de ad be ef" not in text and "deadbeef" not in text and "binary" not in text
    assert any(r.name == "fedlink.protocol.wire" for r in caplog.records), "the wire logger still logs at INFO"
