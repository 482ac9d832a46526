"""Pre-authentication cost (issue 9, defect 6), against real ``fl-worker`` processes that require a token: a
stranger's large frame is refused before it is decoded, a peer that never reads cannot grow the worker's memory,
connections stalled in the TLS handshake count against ``--max-connections``, and one address holds at most
``--max-connections-per-address``. After each attack a legitimate coordinator trains."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path

import msgpack
import pytest
from websockets.asyncio.client import connect

from fedlink.protocol.errors import HandshakeFailed
from fedlink.protocol.session import Session, handshake
from fedlink.protocol.tls import client_context
from fedlink.protocol.transport import MAX_UNREAD_REPLIES, PREAUTH_WRITE_LIMIT, WebSocketChannel, dial
from fedlink.server.localworkers import LocalWorker

from .test_security import HELLO, LIMITS, QUIET, WAIT, _certs, _ring, _tls_args, _train, running, session_with

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _certs(tmp_path_factory.mktemp("pki"), "w1,127.0.0.1")


def _token_args(pki: Path) -> list[str]:
    return ["--token-file", str(pki / "w1" / "token")]


def _coordinator_ring(pki: Path) -> object:
    return _ring(pki / "coordinator" / "tokens" / "w1.token")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _million_empty_arrays() -> bytes:
    """A 1 MB hello whose fields hold a million empty msgpack arrays (what cost 0.6 s of CPU to decode)."""
    lists = {f"f{i}": [[]] * 100_000 for i in range(10)}
    return b"\x01" + msgpack.packb({"v": 1, "type": "hello", "role": "coordinator", "peer_id": "x", **lists})


def test_a_megabyte_hello_is_refused_before_it_is_decoded(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    bomb = _million_empty_arrays()
    assert len(bomb) > 1_000_000
    with running(digit_shards[0][0], *_token_args(pki)) as worker:
        before = _cpu_seconds(worker.process.pid)
        codes = asyncio.run(_send_bombs(worker.url, bomb, 10))
        spent = _cpu_seconds(worker.process.pid) - before
        asyncio.run(_legitimate_job(worker.url, pki))
        log = worker.log_path.read_text()
    print(f"10 hellos of {len(bomb):,} bytes cost the worker {spent:.2f} s of CPU")
    assert codes == [1009] * 10, "closed as 'message too big' by the WebSocket layer"
    assert log.count("sent a frame over our limit") == 10
    assert spent < 2.0, f"{spent:.2f} s of CPU for 10 refusals: the frames were decoded"


async def _send_bombs(url: str, bomb: bytes, count: int) -> list[int | None]:
    codes: list[int | None] = []
    for _ in range(count):
        async with connect(url, subprotocols=["fedlink.v1"], max_size=1 << 20) as ws:  # type: ignore[list-item]
            await ws.send(bomb)
            await ws.wait_closed()
            codes.append(ws.close_code)
    return codes


async def _legitimate_job(url: str, pki: Path, ssl_context: object = None) -> None:
    async with session_with(url, keyring=_coordinator_ring(pki), ssl_context=ssl_context) as session:  # type: ignore[arg-type]
        await _train(session)


_UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: fedlink.v1\r\n\r\n"
)


def _pings(count: int) -> bytes:
    """``count`` masked ping frames of 125 bytes (the largest a control frame may carry)."""
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(os.urandom(125)))
    return (b"\x89\xfd" + mask + payload) * count


def test_a_peer_that_never_reads_cannot_grow_the_workers_memory(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    limit = 64 << 20
    # A long handshake time: only the bound on unread replies can end this connection, not the hello's deadline.
    with running(digit_shards[0][0], *_token_args(pki), "--handshake-timeout", "600") as worker:
        port = int(worker.url.rsplit(":", 1)[1])
        before = _rss_bytes(worker.process.pid)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(_UPGRADE.format(key=base64.b64encode(os.urandom(16)).decode()).encode())
            response = b""
            while b"\r\n\r\n" not in response:
                response += sock.recv(1)  # byte by byte: nothing after the response is read, ever
            assert response.startswith(b"HTTP/1.1 101"), response
            chunk, sent, closed = _pings(1000), 0, False
            while sent < limit:
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                sent += len(chunk)
            grown = _rss_bytes(worker.process.pid) - before
        finally:
            sock.close()
        asyncio.run(_legitimate_job(worker.url, pki))
        log = worker.log_path.read_text()
    print(f"pings sent before the worker hung up: {sent / 1e6:.1f} MB; worker memory grew {grown / 1e6:.1f} MB")
    assert closed, f"the worker read {sent / 1e6:.0f} MB of pings without closing"
    assert "sends pings but does not read the replies" in log
    assert grown < 16 * (PREAUTH_WRITE_LIMIT + MAX_UNREAD_REPLIES) + (8 << 20), f"memory grew {grown / 1e6:.1f} MB"


def test_connections_stalled_in_the_tls_handshake_count(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    args = [*_token_args(pki), *_tls_args(pki, "w1", mutual=False), "--max-connections", "2",
            "--handshake-timeout", "60", "--log-level", "debug"]
    tls = client_context(ca=pki / "ca" / "ca.pem")
    with running(digit_shards[0][0], *args) as worker:
        port = int(worker.url.rsplit(":", 1)[1])
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]  # no ClientHello
        try:
            with pytest.raises(HandshakeFailed, match="as many connections as it accepts"):
                asyncio.run(dial(worker.url, limits=LIMITS, timeout=WAIT, ssl_context=tls))
        finally:
            for sock in stalled:
                sock.close()
        asyncio.run(_until_admitted(worker, tls, pki))
        log = worker.log_path.read_text()
    assert "2 open, the limit is 2 (max_connections)" in log


async def _until_admitted(worker: LocalWorker, tls: object, pki: Path) -> None:
    """The legitimate job, once the worker has seen both stalled connections go (it logs each at DEBUG)."""
    async with asyncio.timeout(WAIT):
        while worker.log_path.read_text().count("TLS handshake from") < 2:
            await asyncio.sleep(0.1)
    await _legitimate_job(worker.url, pki, tls)


def test_one_address_holds_at_most_its_share(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    args = [*_token_args(pki), "--max-connections-per-address", "2", "--handshake-timeout", "60"]
    with running(digit_shards[0][0], *args) as worker:
        port = int(worker.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            with pytest.raises(HandshakeFailed, match="503"):
                asyncio.run(dial(worker.url, limits=LIMITS, timeout=WAIT))
            # Another address (all of 127/8 is loopback) still gets in, and trains.
            asyncio.run(_train_from("127.0.0.2", worker.url, pki))
        finally:
            for sock in idle:
                sock.close()
        log = worker.log_path.read_text()
    assert "2 open from 127.0.0.1, the limit per address is 2 (max_connections_per_address)" in log


async def _train_from(source: str, url: str, pki: Path) -> None:
    connection = await connect(url, subprotocols=["fedlink.v1"], local_addr=(source, 0))  # type: ignore[list-item]
    channel = WebSocketChannel(connection, peer=url, limits=LIMITS)
    peer = await handshake(channel, HELLO, limits=LIMITS, timeout=WAIT, keyring=_coordinator_ring(pki), initiator=True)  # type: ignore[arg-type]
    session = Session(channel, peer=peer, limits=LIMITS, options=QUIET)
    session.start()
    try:
        await _train(session)
    finally:
        await session.close("done")
