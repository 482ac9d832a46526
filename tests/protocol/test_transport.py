"""Real WebSockets on 127.0.0.1: dial, listen, handshake, big transfers, and a listener that survives bad clients."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fedlink.protocol.channel import ChannelClosed
from fedlink.protocol.errors import HandshakeFailed, ProtocolError
from fedlink.protocol.frames import decode_frame, encode_message
from fedlink.protocol.limits import MiB, Limits
from fedlink.protocol.messages import (
    Bye,
    ErrorMessage,
    Hello,
    Message,
    ModelSpec,
    TrainingPlan,
    TrainRequest,
    TrainResult,
)
from fedlink.protocol.session import Inbound, Session, SessionOptions, handshake
from fedlink.protocol.tensors import State, header_of
from fedlink.protocol.transport import Listener, WebSocketChannel, dial, listen

pytestmark = pytest.mark.timeout(120)

COORDINATOR = Hello(role="coordinator", peer_id="c1")
WORKER = Hello(role="worker", peer_id="w1")
QUIET = SessionOptions(heartbeat_interval=0)
WAIT = 10.0


def train(task_id: str = "t") -> TrainRequest:
    return TrainRequest(round=1, task_id=task_id, model=ModelSpec(factory="m:f"), plan=TrainingPlan())


def result_for(message: Message) -> TrainResult:
    assert isinstance(message, TrainRequest)
    return TrainResult(round=message.round, task_id=message.task_id, update="weights", num_samples=1)


async def echo_state(session: Session, inbound: Inbound) -> None:
    """Fetch the announced state (if any) and send it straight back."""
    state = await inbound.fetch(timeout=WAIT) if inbound.state_header is not None else None
    await session.reply(inbound, result_for(inbound.message), state=state)


@dataclass
class Served:
    listener: Listener
    sessions: list[Session] = field(default_factory=list)
    refused: list[Exception] = field(default_factory=list)
    started: asyncio.Queue[Session] = field(default_factory=asyncio.Queue)
    ended: asyncio.Queue[str] = field(default_factory=asyncio.Queue)


@asynccontextmanager
async def serving(limits: Limits, hello: Hello = COORDINATOR) -> AsyncIterator[Served]:
    served: Served | None = None

    async def on_channel(channel: WebSocketChannel) -> None:
        assert served is not None
        try:
            peer = await handshake(channel, hello, limits=limits, timeout=WAIT)
        except ProtocolError as exc:
            served.refused.append(exc)
            await served.ended.put(f"refused: {exc}")
            return
        session = Session(channel, peer=peer, limits=limits, handler=echo_state, options=QUIET)
        served.sessions.append(session)
        session.start()
        await served.started.put(session)
        await served.ended.put(await session.wait_closed())

    served = Served(await listen(on_channel, host="127.0.0.1", port=0, limits=limits))
    try:
        yield served
    finally:
        for session in served.sessions:
            await session.close("server stopping")
        await served.listener.close()


@asynccontextmanager
async def client(url: str, limits: Limits, hello: Hello = WORKER) -> AsyncIterator[Session]:
    channel = await dial(url, limits=limits, timeout=WAIT)
    peer = await handshake(channel, hello, limits=limits, timeout=WAIT)
    session = Session(channel, peer=peer, limits=limits, options=QUIET)
    session.start()
    try:
        yield session
    finally:
        await session.close("client done")


def assert_bit_exact(got: State, want: State) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name


async def _round_trip(megabytes: int) -> None:
    limits = Limits()  # 1 MiB chunks, 4 MiB frames: a big state is many frames
    n = megabytes * MiB // 4
    g = torch.Generator().manual_seed(3)
    state = {
        "big": torch.randn(n - 1000, generator=g),
        "bias": torch.randn(1000, generator=g),
        "steps": torch.tensor(7),
    }
    state["big"][:3] = torch.tensor([float("nan"), -0.0, float("inf")])
    async with serving(limits) as served, client(served.listener.url, limits) as session:
        answer = await session.request(train(), state=state, timeout=120)
        assert answer.state_header == header_of(state)
        back = await answer.fetch(expected=header_of(state), timeout=120)
        assert_bit_exact(back, state)
        assert session.counters.bytes_out > megabytes * MiB and session.counters.bytes_in > megabytes * MiB


async def test_state_round_trip_20mb() -> None:
    await _round_trip(20)


async def test_state_round_trip_200mb() -> None:
    # About 1 s and 0.9 GB of memory on a 2-core machine, so it runs everywhere; mark it slow if that changes
    # (the 20 MB test above then keeps the path covered).
    await _round_trip(200)


@pytest.mark.parametrize("listener_role", ["coordinator", "worker"])
async def test_dial_listen_handshake_either_side(listener_role: str) -> None:
    """Who dials does not matter: a worker may listen for its coordinator or dial it."""
    limits = Limits()
    server_hello, client_hello = (COORDINATOR, WORKER) if listener_role == "coordinator" else (WORKER, COORDINATOR)
    async with serving(limits, server_hello) as served, client(served.listener.url, limits, client_hello) as session:
        assert session.peer_hello == server_hello
        assert served.listener.url == f"ws://127.0.0.1:{served.listener.port}" and served.listener.port > 0
        answer = await session.request(train("hi"), timeout=WAIT)
        assert isinstance(answer.message, TrainResult) and answer.message.task_id == "hi"
        assert served.sessions[0].peer_hello == client_hello


async def test_dial_closed_port() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}"
    with pytest.raises(HandshakeFailed, match=f"could not connect to {url}"):
        await dial(url, limits=Limits(), timeout=WAIT)


@pytest.mark.parametrize("url", ["not a url", "http://127.0.0.1:1/", "ws://"])
async def test_dial_bad_url(url: str) -> None:
    with pytest.raises(HandshakeFailed, match="could not connect to"):
        await dial(url, limits=Limits(), timeout=WAIT)


async def test_client_closing_ends_the_server_session() -> None:
    limits = Limits()
    async with serving(limits) as served:
        async with client(served.listener.url, limits):
            pass
        reason = await asyncio.wait_for(served.ended.get(), WAIT)
        assert reason == "peer said goodbye (client done)"


async def test_server_closing_fails_the_client_session() -> None:
    limits = Limits()
    async with serving(limits) as served, client(served.listener.url, limits) as session:
        server_side = await asyncio.wait_for(served.started.get(), WAIT)
        await server_side.close("maintenance")
        assert await asyncio.wait_for(session.wait_closed(), WAIT) == "peer said goodbye (maintenance)"


@pytest.mark.parametrize("reason", ["", "short", "x" * 500, "é" * 200, "a" + "☃" * 60])
async def test_channel_close_with_any_reason_closes_the_connection(reason: str) -> None:
    seen: asyncio.Queue[BaseException] = asyncio.Queue()

    async def on_channel(channel: WebSocketChannel) -> None:
        try:
            await channel.recv()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            await seen.put(exc)

    listener = await listen(on_channel, host="127.0.0.1", port=0, limits=Limits())
    try:
        channel = await dial(listener.url, limits=Limits(), timeout=WAIT)
        await channel.close(reason)
        closed = await asyncio.wait_for(seen.get(), WAIT)
        assert isinstance(closed, ChannelClosed) and "closed with code 1000" in str(closed)
        assert reason.encode()[:50].decode(errors="ignore") in str(closed)
        await channel.close(reason)  # idempotent
    finally:
        await listener.close()


async def _raw_recv(ws: object) -> Message:
    frame = decode_frame(await asyncio.wait_for(ws.recv(), WAIT), Limits())  # type: ignore[attr-defined]
    assert isinstance(frame, Message)
    return frame


async def test_listener_survives_bad_clients() -> None:
    limits = Limits(chunk_bytes=4096, max_frame_bytes=64 * 1024)
    async with serving(limits) as served:
        url = served.listener.url
        # 1. Garbage instead of a hello: refused with a reason, connection closed.
        async with connect(url, subprotocols=["fedlink.v1"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "fedlink.v1"
            await ws.send(b"\x07 not a fedlink frame")
            assert await _raw_recv(ws) == COORDINATOR
            told = await _raw_recv(ws)
            assert isinstance(told, ErrorMessage) and told.code == "malformed"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
        assert (await asyncio.wait_for(served.ended.get(), WAIT)).startswith("refused: bad hello")

        # 2. A proper hello, then garbage binary frames and text frames: each gets an error, the session lives.
        async with connect(url, subprotocols=["fedlink.v1"], max_size=1 << 20) as ws:  # type: ignore[list-item]
            await ws.send(encode_message(WORKER))
            assert await _raw_recv(ws) == COORDINATOR
            for garbage in (b"\xff\xfe", b"\x01\xc1", b"\x01\x93\x01\x02\x03", b"", b"\x02short"):
                await ws.send(garbage)
                told = await _raw_recv(ws)
                assert isinstance(told, ErrorMessage) and told.code == "malformed", garbage
            for text in ("hello", '{"v": 1, "type": "heartbeat"}'):
                await ws.send(text)
                told = await _raw_recv(ws)
                assert isinstance(told, ErrorMessage) and told.code == "malformed" and "binary" in told.message
            await ws.send(encode_message(train("still here").model_copy(update={"id": 9})))
            answer = await _raw_recv(ws)
            assert isinstance(answer, TrainResult) and answer.reply_to == 9
            # 3. A frame larger than max_frame_bytes: the connection is dropped (1009, message too big).
            await ws.send(b"\x02" + b"\x00" * (64 * 1024))
            with pytest.raises(ConnectionClosed) as dropped:
                while True:  # anything the server sent before closing is read first
                    await asyncio.wait_for(ws.recv(), WAIT)
            assert dropped.value.rcvd is not None and dropped.value.rcvd.code == 1009
        assert (await asyncio.wait_for(served.ended.get(), WAIT)).startswith("connection lost")
        assert served.sessions[0].counters.malformed == 7

        # 4. A client that vanishes mid-handshake.
        async with connect(url, subprotocols=["fedlink.v1"]) as ws:  # type: ignore[list-item]
            assert await _raw_recv(ws) == COORDINATOR
        assert (await asyncio.wait_for(served.ended.get(), WAIT)).startswith("refused:")

        # The listener still serves a valid client, state transfer included.
        async with client(url, limits) as session:
            state = {"w": torch.arange(5000, dtype=torch.float32)}
            answer = await session.request(train("valid"), state=state, timeout=WAIT)
            assert answer.message.task_id == "valid"
            assert torch.equal((await answer.fetch(timeout=WAIT))["w"], state["w"])


async def test_goodbye_over_a_socket() -> None:
    limits = Limits()
    async with serving(limits) as served:
        async with connect(served.listener.url, subprotocols=["fedlink.v1"]) as ws:  # type: ignore[list-item]
            await ws.send(encode_message(WORKER))
            assert await _raw_recv(ws) == COORDINATOR
            await ws.send(encode_message(Bye(id=1, reason="done for today")))
            assert await asyncio.wait_for(served.ended.get(), WAIT) == "peer said goodbye (done for today)"
