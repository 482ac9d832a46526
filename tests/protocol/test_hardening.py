"""Protocol-level hardening (issue 9): pre-authentication frame and container limits, ids and negotiated values
bounded in the hello, peer text escaped in errors, results held per session bounded, no oracle for unknown ids,
and the channel's small pre-authentication limits lifted exactly once the peer proved itself (real sockets)."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import pytest
import torch

from fedlink.protocol.auth import Keyring, Secret, new_token
from fedlink.protocol.channel import MemoryChannel, memory_pair
from fedlink.protocol.errors import AuthenticationFailed, HandshakeFailed, LimitExceeded, MalformedFrame, RemoteError
from fedlink.protocol.frames import PREAUTH_FRAME_BYTES, decode_frame, encode_message
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import MAX_HEARTBEAT, MIN_HEARTBEAT, ErrorMessage, Hello, TrainResult
from fedlink.protocol.session import Inbound, Session, SessionOptions, handshake
from fedlink.protocol.transport import WebSocketChannel, dial, listen

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits()
WAIT = 10.0
COORDINATOR = Hello(role="coordinator", peer_id="c1")
WORKER = Hello(role="worker", peer_id="w1")


def _control(body: object) -> bytes:
    return b"\x01" + msgpack.packb(body, use_bin_type=True)


def _hello(**fields: object) -> dict[str, object]:
    return {"v": 1, "type": "hello", "role": "worker", "peer_id": "w1", **fields}


# -- frames before authentication -------------------------------------------------------------------------------------


def test_a_megabyte_of_empty_arrays_is_refused_by_its_size_before_authentication() -> None:
    bomb = _control(_hello(capabilities=[[]] * 1_000_000))
    with pytest.raises(LimitExceeded, match=f"before authentication, limit is {PREAUTH_FRAME_BYTES}"):
        decode_frame(bomb, LIMITS, preauth=True)
    with pytest.raises(MalformedFrame):  # after authentication msgpack's own bounds still refuse it
        decode_frame(bomb, LIMITS)


@pytest.mark.parametrize(
    "body",
    [
        _hello(capabilities=[[]] * 65),  # an array over the pre-authentication bound
        {**_hello(), **{f"k{i}": 0 for i in range(40)}},  # a map over it
        _hello(software="é" * 3000),  # a string over it (also over the frame size)
    ],
)
def test_containers_are_bounded_tightly_before_authentication(body: dict[str, object]) -> None:
    with pytest.raises((MalformedFrame, LimitExceeded)):
        decode_frame(_control(body), LIMITS, preauth=True)


def test_a_normal_hello_decodes_before_authentication() -> None:
    hello = Hello(role="worker", peer_id="site-a", capabilities=("train", "evaluate"), auth="hmac-sha256")
    assert decode_frame(encode_message(hello), LIMITS, preauth=True) == hello


@pytest.mark.parametrize("peer_id", ["lab[/x]", "a\nb", "\x1b]0;t\x07", "x" * 129, "", " a"])
def test_unsafe_ids_are_refused_in_the_hello(peer_id: str) -> None:
    with pytest.raises(MalformedFrame, match="peer_id") as refused:
        decode_frame(_control(_hello(peer_id=peer_id)), LIMITS, preauth=True)
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


@pytest.mark.parametrize("heartbeat", [5e-324, 0.0, MIN_HEARTBEAT * 0.99, MAX_HEARTBEAT * 1.01, float("inf")])
def test_heartbeats_out_of_bounds_are_refused(heartbeat: float) -> None:
    with pytest.raises(MalformedFrame, match="heartbeat"):
        decode_frame(_control(_hello(heartbeat=heartbeat)), LIMITS)


def test_peer_field_names_in_errors_are_escaped() -> None:
    with pytest.raises(MalformedFrame) as refused:
        decode_frame(_control(_hello(**{"x\nFORGED\x1b[2J": 1})), LIMITS)
    assert "FORGED" in str(refused.value) and "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


def test_a_remote_error_escapes_the_peers_words() -> None:
    error = RemoteError("busy\x1b[31m", "line\r\nFORGED", peer="worker 'w1'")
    assert "\n" not in str(error) and "\x1b" not in str(error) and "FORGED" in error.remote_message


# -- session options --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"outbound_ttl": 0.0}, {"outbound_ttl": 86400.0}, {"max_outbound": 0}, {"heartbeat_interval": -1.0},
     {"heartbeat_interval": float("nan")}, {"inbound_slots": 0}, {"heartbeat_timeout": 0.0}],
)
def test_session_options_are_bounded(options: dict[str, float]) -> None:
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"SessionOptions.{name}"):
        SessionOptions(**options)  # type: ignore[arg-type]


async def _pair(options_b: SessionOptions) -> tuple[Session, Session]:
    end_a, end_b = memory_pair("a", "b")
    hello_b, hello_a = await asyncio.gather(
        handshake(end_a, COORDINATOR, limits=LIMITS, timeout=WAIT), handshake(end_b, WORKER, limits=LIMITS, timeout=WAIT)
    )

    async def answer(session: Session, inbound: Inbound) -> None:
        result = TrainResult(round=0, task_id="t", update="weights", num_samples=1)
        await session.reply(inbound, result, state={"w": torch.full((4,), float(inbound.message.id))})

    a = Session(end_a, peer=hello_b, limits=LIMITS, options=SessionOptions(heartbeat_interval=0))
    b = Session(end_b, peer=hello_a, limits=LIMITS, options=options_b, handler=answer)
    a.start()
    b.start()
    return a, b


async def test_results_never_pulled_are_bounded_and_the_oldest_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from fedlink.protocol.messages import ModelSpec, TrainingPlan, TrainRequest

    a, b = await _pair(SessionOptions(heartbeat_interval=0, max_outbound=2))
    try:
        request = TrainRequest(round=0, task_id="t", model=ModelSpec(factory="m:f"), plan=TrainingPlan())
        with caplog.at_level(logging.WARNING, logger="fedlink.protocol.session"):
            answers = [await a.request(request, timeout=WAIT) for _ in range(3)]
        assert "the most kept is 2" in caplog.text
        with pytest.raises(Exception, match="no such state"):
            await answers[0].fetch(timeout=WAIT)
        for answer in answers[1:]:
            assert (await answer.fetch(timeout=WAIT))["w"].shape == (4,)
    finally:
        await a.close()
        await b.close()


# -- no oracle for unknown ids ----------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, inner: MemoryChannel) -> None:
        self.inner, self.peer = inner, inner.peer
        self.received: list[str] = []

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes | str:
        data = await self.inner.recv()
        frame = decode_frame(data, LIMITS)
        self.received.append(f"{frame.code}:{frame.message}" if isinstance(frame, ErrorMessage) else str(getattr(frame, "type", "data")))
        return data

    async def close(self, reason: str = "") -> None:
        await self.inner.close(reason)


async def _try(worker_id: str, listener: Keyring) -> tuple[list[str], str]:
    end_c, end_w = memory_pair("coordinator", "worker")
    recorder = _Recorder(end_w)
    stranger = Keyring(shared=Secret.from_token(new_token().encode(), origin="guess"))
    got = await asyncio.gather(
        handshake(end_c, COORDINATOR, limits=LIMITS, timeout=WAIT, keyring=listener),
        handshake(recorder, Hello(role="worker", peer_id=worker_id), limits=LIMITS, timeout=WAIT, keyring=stranger,
                  initiator=True),
        return_exceptions=True,
    )
    assert all(isinstance(g, AuthenticationFailed) for g in got), got
    return recorder.received, str(got[0])


async def test_an_unknown_id_gets_the_same_answers_as_a_known_one() -> None:
    listener = Keyring(per_peer={"w1": Secret.from_token(new_token().encode(), origin="w1's token")}, missing="add it")
    known, known_log = await _try("w1", listener)
    unknown, unknown_log = await _try("w9", listener)
    assert known == unknown and known[:2] == ["hello", "auth_challenge"] and known[2].startswith("auth_failed:")
    assert "no token for worker 'w9'" in unknown_log and "add it" in unknown_log, "the operator's log says which"
    assert "did not prove" in known_log


# -- the channel's limits over real sockets ---------------------------------------------------------------------------


@pytest.mark.parametrize("authenticated", [True, False])
async def test_large_frames_flow_once_the_handshake_is_done(authenticated: bool) -> None:
    """A state of 3 MiB (1 MiB chunks) after the handshake, either side sending: the small limits were lifted."""
    token = new_token().encode()
    ring = Keyring(shared=Secret.from_token(token, origin="t")) if authenticated else None
    big = {"x": torch.arange(3 << 18, dtype=torch.float32)}
    served: list[Session] = []

    async def answer(session: Session, inbound: Inbound) -> None:
        state = await inbound.fetch(timeout=WAIT)
        await session.reply(inbound, TrainResult(round=0, task_id="t", update="weights", num_samples=1), state=state)

    async def on_channel(channel: WebSocketChannel) -> None:
        peer = await handshake(channel, WORKER, limits=LIMITS, timeout=WAIT, keyring=ring)
        session = Session(channel, peer=peer, limits=LIMITS, handler=answer, options=SessionOptions(heartbeat_interval=0))
        served.append(session)
        session.start()
        await session.wait_closed()

    listener = await listen(on_channel, host="127.0.0.1", port=0, limits=LIMITS)
    try:
        channel = await dial(listener.url, limits=LIMITS, timeout=WAIT)
        peer = await handshake(channel, COORDINATOR, limits=LIMITS, timeout=WAIT, keyring=ring, initiator=True)
        session = Session(channel, peer=peer, limits=LIMITS, options=SessionOptions(heartbeat_interval=0))
        session.start()
        from fedlink.protocol.messages import ModelSpec, TrainingPlan, TrainRequest

        request = TrainRequest(round=0, task_id="t", model=ModelSpec(factory="m:f"), plan=TrainingPlan())
        answer_in = await session.request(request, state=big, timeout=WAIT)
        assert torch.equal((await answer_in.fetch(timeout=WAIT))["x"], big["x"])
        await session.close()
    finally:
        await listener.close()


async def test_a_large_frame_before_authentication_closes_the_connection() -> None:
    ring = Keyring(shared=Secret.from_token(new_token().encode(), origin="t"))
    refused: list[Exception] = []

    async def on_channel(channel: WebSocketChannel) -> None:
        try:
            await handshake(channel, WORKER, limits=LIMITS, timeout=WAIT, keyring=ring)
        except HandshakeFailed as exc:
            refused.append(exc)

    listener = await listen(on_channel, host="127.0.0.1", port=0, limits=LIMITS)
    try:
        channel = await dial(listener.url, limits=LIMITS, timeout=WAIT)
        channel.lift_preauth_limits()  # a stranger sends what it likes
        await channel.send(_control(_hello(role="coordinator", software="x" * 100, pad="y" * 20_000)))
        with pytest.raises(Exception):  # noqa: B017 - closed by the listener, however the library words it
            while True:
                await channel.recv()
    finally:
        await listener.close()
    assert refused and "over our limit" in str(refused[0])
