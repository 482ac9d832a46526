"""Sessions in memory (no sockets): handshake, requests, state transfers, errors, timeouts, heartbeats, closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgpack
import pytest
import torch

from fedlink.errors import DataError
from fedlink.protocol.channel import ChannelClosed, MemoryChannel, memory_pair
from fedlink.protocol.errors import (
    HandshakeFailed,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    SessionClosed,
    StateMismatch,
    TransferError,
    VersionMismatch,
)
from fedlink.protocol.frames import DataFrame, decode_frame, encode_data, encode_message
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import (
    Bye,
    Discard,
    ErrorMessage,
    Heartbeat,
    Hello,
    Message,
    ModelSpec,
    Pull,
    TrainingPlan,
    TrainRequest,
    TrainResult,
)
from fedlink.protocol.session import Inbound, Session, SessionOptions, handshake
from fedlink.protocol.tensors import State, StateHeader, TensorSpec, header_of

pytestmark = pytest.mark.timeout(30)

COORDINATOR = Hello(role="coordinator", peer_id="c1")
WORKER = Hello(role="worker", peer_id="w1")
QUIET = SessionOptions(heartbeat_interval=0)  # no background traffic unless a test asks for it
SMALL = Limits(chunk_bytes=4096)
WIDE = Limits(max_frame_bytes=64 << 20)  # for peeking at frames in tests
WAIT = 5.0  # generous bound on anything that should happen at once


def train(task_id: str = "t", round: int = 1) -> TrainRequest:
    return TrainRequest(round=round, task_id=task_id, model=ModelSpec(factory="m:f"), plan=TrainingPlan())


def result_for(message: Message) -> TrainResult:
    assert isinstance(message, TrainRequest)
    return TrainResult(round=message.round, task_id=message.task_id, update="weights", num_samples=1)


def model_state(scale: float = 1.0, n: int = 30000) -> State:
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(n, generator=g) * scale
    weight[:4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")])
    return {
        "fc.weight": weight.reshape(-1, 10).t(),  # non-contiguous
        "fc.bias": torch.randn(10, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(12),
        "mask": torch.rand(7, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
    }


def assert_bit_exact(got: State, want: State) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        assert torch.equal(g.reshape(-1).contiguous().view(torch.uint8), w.reshape(-1).contiguous().view(torch.uint8))


def peek(data: bytes | str) -> Message | DataFrame | bytes | str:
    try:
        return decode_frame(data, WIDE)
    except ProtocolError:
        return data


class Tap:
    """A channel that records what passes through it and lets a test wait for a condition on that record.

    ``hold_data``, when given, makes outgoing data frames wait for it: a transfer that is under way but stuck.
    """

    def __init__(self, inner: MemoryChannel) -> None:
        self.inner = inner
        self.peer = inner.peer
        self.log: list[tuple[str, Message | DataFrame | bytes | str]] = []
        self.hold_data: asyncio.Event | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def _record(self, direction: str, data: bytes | str) -> None:
        frame = peek(data)
        if isinstance(frame, DataFrame):  # keep no payloads alive
            frame = DataFrame(ref=frame.ref, seq=frame.seq, payload=memoryview(b""))
        self.log.append((direction, frame))
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)

    async def send(self, data: bytes) -> None:
        if self.hold_data is not None and data[:1] == b"\x02":
            await self.hold_data.wait()
        # Recorded before it leaves, so the record of a request always precedes the record of its answer.
        self._record("sent", data)
        await self.inner.send(data)

    async def recv(self) -> bytes | str:
        data = await self.inner.recv()
        self._record("recv", data)
        return data

    async def close(self, reason: str = "") -> None:
        await self.inner.close(reason)

    def frames(self, direction: str, kind: type) -> list:
        return [f for d, f in self.log if d == direction and isinstance(f, kind)]

    async def until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove((predicate, future))


@dataclass
class Pair:
    a: Session  # the coordinator
    b: Session  # the worker
    tap_a: Tap
    tap_b: Tap


@asynccontextmanager
async def sessions(
    handler_a: Callable[[Session, Inbound], Awaitable[None]] | None = None,
    handler_b: Callable[[Session, Inbound], Awaitable[None]] | None = None,
    *,
    options_a: SessionOptions = QUIET,
    options_b: SessionOptions = QUIET,
    limits_a: Limits = SMALL,
    limits_b: Limits = SMALL,
) -> AsyncIterator[Pair]:
    end_a, end_b = memory_pair("a", "b")
    tap_a, tap_b = Tap(end_a), Tap(end_b)
    hello_b, hello_a = await asyncio.gather(
        handshake(tap_a, COORDINATOR, limits=limits_a, timeout=WAIT),
        handshake(tap_b, WORKER, limits=limits_b, timeout=WAIT),
    )
    a = Session(tap_a, peer=hello_b, limits=limits_a, handler=handler_a, options=options_a, name="a")
    b = Session(tap_b, peer=hello_a, limits=limits_b, handler=handler_b, options=options_b, name="b")
    a.start()
    b.start()
    try:
        yield Pair(a, b, tap_a, tap_b)
    finally:
        await a.close("test over")
        await b.close("test over")


async def echo(session: Session, inbound: Inbound) -> None:
    await session.reply(inbound, result_for(inbound.message))


async def recv_frame(channel: MemoryChannel) -> Message | DataFrame:
    frame = decode_frame(await asyncio.wait_for(channel.recv(), WAIT), WIDE)
    return frame


# -- handshake ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["worker", "coordinator"])
async def test_handshake_either_order(first: str) -> None:
    end_w, end_c = memory_pair("w", "c")
    sides = {
        "worker": handshake(end_w, WORKER, limits=SMALL, timeout=WAIT),
        "coordinator": handshake(end_c, COORDINATOR, limits=SMALL, timeout=WAIT),
    }
    started = asyncio.ensure_future(sides.pop(first))
    other = await sides.popitem()[1]
    mine = await started
    got = {first: mine, "worker" if first == "coordinator" else "coordinator": other}
    assert got["worker"] == COORDINATOR, "the worker learns the coordinator's hello"
    assert got["coordinator"] == WORKER


async def test_handshake_when_one_side_hello_is_already_waiting() -> None:
    end_w, end_c = memory_pair("w", "c")
    await end_c.send(encode_message(COORDINATOR))  # the coordinator spoke long before the worker listens
    assert await handshake(end_w, WORKER, limits=SMALL, timeout=WAIT) == COORDINATOR
    assert await recv_frame(end_c) == WORKER


@pytest.mark.parametrize("hello", [WORKER, COORDINATOR], ids=["worker", "coordinator"])
async def test_handshake_same_role_refused_on_both_sides(hello: Hello) -> None:
    end_1, end_2 = memory_pair("one", "two")
    results = await asyncio.gather(
        handshake(end_1, hello, limits=SMALL, timeout=WAIT),
        handshake(end_2, hello.model_copy(update={"peer_id": "other"}), limits=SMALL, timeout=WAIT),
        return_exceptions=True,
    )
    for refused in results:
        assert isinstance(refused, HandshakeFailed)
        assert f"is a {hello.role} too" in str(refused)
    for end in (end_1, end_2):  # each side also told the other why
        told = await recv_frame(end)
        assert isinstance(told, ErrorMessage) and told.code == "handshake_failed"


async def test_handshake_version_mismatch_reported_on_both_sides() -> None:
    ours, theirs = memory_pair("ours", "theirs")
    future_hello = {"v": 2, "id": 0, "type": "hello", "role": "coordinator", "peer_id": "from-the-future"}
    await theirs.send(b"\x01" + msgpack.packb(future_hello))
    with pytest.raises(VersionMismatch) as refused:
        await handshake(ours, WORKER, limits=SMALL, timeout=WAIT)
    assert "version 2" in str(refused.value) and "speaks 1" in str(refused.value)
    # The newer peer gets our hello and then our reason, so its log says the same thing.
    assert await recv_frame(theirs) == WORKER
    told = await recv_frame(theirs)
    assert isinstance(told, ErrorMessage) and told.code == "version_mismatch"
    assert "version 2" in told.message and "speaks 1" in told.message


async def test_handshake_peer_refuses() -> None:
    ours, theirs = memory_pair()
    await theirs.send(encode_message(ErrorMessage(code="busy", message="one coordinator at a time")))
    with pytest.raises(RemoteError) as refused:
        await handshake(ours, COORDINATOR, limits=SMALL, timeout=WAIT)
    assert refused.value.code == "busy" and refused.value.remote_message == "one coordinator at a time"


@pytest.mark.parametrize(
    ("first", "match", "code"),
    [
        (encode_message(Heartbeat()), "expected hello", "handshake_failed"),
        (encode_data(1, 0, b"x"), "expected hello", "handshake_failed"),
        (b"\x01\xc1", "bad hello", "malformed"),
        (b"\x07garbage", "bad hello", "malformed"),
        (b"\x01" + msgpack.packb({"v": 1, "type": "hello", "role": "worker"}), "bad hello", "malformed"),
    ],
    ids=["heartbeat", "data", "bad-msgpack", "bad-kind", "hello-without-peer-id"],
)
async def test_handshake_bad_first_frame(first: bytes, match: str, code: str) -> None:
    ours, theirs = memory_pair()
    await theirs.send(first)
    with pytest.raises(HandshakeFailed, match=match):
        await handshake(ours, COORDINATOR, limits=SMALL, timeout=WAIT)
    assert await recv_frame(theirs) == COORDINATOR
    told = await recv_frame(theirs)
    assert isinstance(told, ErrorMessage) and told.code == code


async def test_handshake_timeout() -> None:
    ours, _silent = memory_pair()
    with pytest.raises(HandshakeFailed, match="no hello from .* within 0.05s"):
        await handshake(ours, COORDINATOR, limits=SMALL, timeout=0.05)


async def test_handshake_peer_closes() -> None:
    ours, theirs = memory_pair()
    await theirs.close()
    with pytest.raises(HandshakeFailed, match="closed the connection"):
        await handshake(ours, COORDINATOR, limits=SMALL, timeout=WAIT)


# -- requests and replies -----------------------------------------------------------------------------------------


async def test_request_reply() -> None:
    seen: list[Inbound] = []

    async def handler(session: Session, inbound: Inbound) -> None:
        seen.append(inbound)
        await echo(session, inbound)

    async with sessions(handler_b=handler) as pair:
        answer = await pair.a.request(train("job", round=3), timeout=WAIT)
        assert isinstance(answer.message, TrainResult)
        assert (answer.message.task_id, answer.message.round) == ("job", 3)
        assert answer.message.reply_to == seen[0].message.id
        assert answer.state_header is None and seen[0].state_header is None
        assert pair.a.peer_hello == WORKER and pair.b.peer_hello == COORDINATOR


async def test_either_side_may_request() -> None:
    async with sessions(handler_a=echo, handler_b=echo) as pair:
        assert (await pair.b.request(train("up"), timeout=WAIT)).message.task_id == "up"
        assert (await pair.a.request(train("down"), timeout=WAIT)).message.task_id == "down"


async def test_ids_are_unique_per_sender() -> None:
    async with sessions(handler_b=echo) as pair:
        for _ in range(3):
            await pair.a.request(train(), timeout=WAIT)
        await pair.a.send(Heartbeat())
        ids = [f.id for f in pair.tap_a.frames("sent", TrainRequest)] + [f.id for f in pair.tap_a.frames("sent", Heartbeat)]
        assert len(set(ids)) == len(ids) and all(i > 0 for i in ids)


async def test_state_both_ways() -> None:
    got_by_handler: list[State] = []
    sent = model_state()
    update = model_state(scale=-2.0)

    async def handler(session: Session, inbound: Inbound) -> None:
        assert inbound.state_header == header_of(sent)
        got_by_handler.append(await inbound.fetch(expected=header_of(update), timeout=WAIT))
        await session.reply(inbound, result_for(inbound.message), state=update)

    async with sessions(handler_b=handler) as pair:
        answer = await pair.a.request(train(), state=sent, timeout=WAIT)
        assert answer.state_header == header_of(update)
        got = await answer.fetch(timeout=WAIT)
        assert_bit_exact(got_by_handler[0], sent)
        assert_bit_exact(got, update)
        assert answer.fetched
        # Both announced states were pulled, so neither side keeps a reference to them.
        assert pair.a._outbound == {} and pair.b._outbound == {}
        nbytes = header_of(sent).nbytes
        chunks = [f for f in pair.tap_a.frames("sent", DataFrame)]
        assert len(chunks) == -(-nbytes // SMALL.chunk_bytes) and len(chunks) > 5


async def test_a_pulled_state_is_not_kept_by_the_request_while_the_peer_works() -> None:
    """Once the peer has pulled the state, nothing of the request holds it: a FedBuff coordinator replaces its model
    while workers train, and each busy worker must not keep an old one alive."""
    import gc
    import weakref

    pulled, finish = asyncio.Event(), asyncio.Event()

    async def handler(session: Session, inbound: Inbound) -> None:
        await inbound.fetch(timeout=WAIT)
        pulled.set()
        await finish.wait()  # "training"
        await session.reply(inbound, result_for(inbound.message))

    async with sessions(handler_b=handler) as pair:
        state = model_state()
        watch = weakref.ref(state["fc.bias"])
        asked = asyncio.ensure_future(pair.a.request(train(), state=state, timeout=WAIT))
        del state
        await asyncio.wait_for(pulled.wait(), WAIT)
        gc.collect()
        alive = watch() is not None
        finish.set()
        await asked
    assert not alive, "the request kept the state it had sent after the peer pulled it"


async def test_a_request_its_caller_abandons_lets_go_of_the_state_it_announced() -> None:
    """The caller's own deadline cancels the request before the peer pulled: the announced state is dropped at once,
    not kept until the outbound TTL expires."""
    handled = asyncio.Event()

    async def handler(session: Session, inbound: Inbound) -> None:
        handled.set()
        await asyncio.Event().wait()  # never pulls, never answers

    async with sessions(handler_b=handler) as pair:
        asked = asyncio.ensure_future(pair.a.request(train(), state=model_state(), timeout=None))
        await asyncio.wait_for(handled.wait(), WAIT)
        assert len(pair.a._outbound) == 1
        asked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asked
        assert pair.a._outbound == {}


async def test_empty_state_transfer() -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        state = await inbound.fetch(timeout=WAIT)
        await session.reply(inbound, result_for(inbound.message), state=state)

    async with sessions(handler_b=handler) as pair:
        empty = {"nothing": torch.empty(0), "none": torch.zeros(2, 0, dtype=torch.int64)}
        answer = await pair.a.request(train(), state=empty, timeout=WAIT)
        assert_bit_exact(await answer.fetch(timeout=WAIT), empty)
        assert_bit_exact(await (await pair.a.request(train(), state={}, timeout=WAIT)).fetch(timeout=WAIT), {})


async def test_expected_mismatch_refused_before_transfer() -> None:
    model = {"fc.weight": torch.zeros(10, 300), "fc.bias": torch.zeros(10)}
    refusals: list[Exception] = []

    async def handler(session: Session, inbound: Inbound) -> None:
        try:
            await inbound.fetch(expected=header_of(model), timeout=WAIT)
        except StateMismatch as exc:
            refusals.append(exc)
            raise

    async with sessions(handler_b=handler) as pair:
        wrong = {"fc.weight": torch.zeros(300, 10), "fc.bias": torch.zeros(10)}
        with pytest.raises(RemoteError) as refused:
            await pair.a.request(train(), state=wrong, timeout=WAIT)
        assert refused.value.code == "state_mismatch"
        assert "fc.weight float32[300, 10] where fc.weight float32[10, 300] was expected" in refused.value.remote_message
        assert isinstance(refusals[0], StateMismatch)
        # The refusal was a Discard (sent before the error reply): the announced state is freed, no byte moved.
        assert pair.a._outbound == {}
        assert [f.ref for f in pair.tap_a.frames("recv", Discard)] == [pair.tap_a.frames("sent", TrainRequest)[0].id]
        assert pair.tap_a.frames("sent", DataFrame) == [] and pair.tap_b.frames("sent", Pull) == []


async def test_limits_refused_before_transfer() -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        await inbound.fetch(timeout=WAIT)

    async with sessions(handler_b=handler, limits_b=Limits(chunk_bytes=4096, max_state_bytes=1000)) as pair:
        with pytest.raises(RemoteError) as refused:
            await pair.a.request(train(), state={"big": torch.zeros(251)}, timeout=WAIT)
        assert refused.value.code == "limit_exceeded"
        assert "1004 bytes, limit is 1000" in refused.value.remote_message
        assert pair.a._outbound == {} and pair.tap_a.frames("sent", DataFrame) == []


async def test_discard() -> None:
    problems: list[Exception] = []

    async def handler(session: Session, inbound: Inbound) -> None:
        await inbound.discard()
        assert inbound.discarded
        await inbound.discard()  # idempotent
        try:
            await inbound.fetch(timeout=WAIT)
        except TransferError as exc:
            problems.append(exc)
        await echo(session, inbound)

    async with sessions(handler_b=handler) as pair:
        await pair.a.request(train(), state=model_state(), timeout=WAIT)
        assert pair.a._outbound == {}, "the Discard arrived before the reply"
        assert len(pair.tap_b.frames("sent", Discard)) == 1
        assert "already fetched or discarded" in str(problems[0])
        assert pair.tap_a.frames("sent", DataFrame) == []


async def test_unused_state_is_discarded_when_the_handler_ends() -> None:
    async with sessions(handler_a=echo, handler_b=echo) as pair:
        await pair.a.request(train(), state=model_state(), timeout=WAIT)
        # The worker's handler ignored the state; its end discards it after replying. The reader handles a
        # Discard as soon as it receives it, before the waiting test runs again.
        await pair.tap_a.until(lambda: len(pair.tap_a.frames("recv", Discard)) == 1)
        assert pair.a._outbound == {}
        assert pair.tap_a.frames("sent", DataFrame) == []


async def test_fetch_misuse() -> None:
    async with sessions(handler_b=echo) as pair:
        answer = await pair.a.request(train(), timeout=WAIT)
        with pytest.raises(TransferError, match="carries no model state"):
            await answer.fetch()
        await answer.discard()  # nothing to discard: no-op
        assert not answer.discarded


async def test_fetch_twice() -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        await session.reply(inbound, result_for(inbound.message), state={"w": torch.ones(3)})

    async with sessions(handler_b=handler) as pair:
        answer = await pair.a.request(train(), timeout=WAIT)
        assert torch.equal((await answer.fetch(timeout=WAIT))["w"], torch.ones(3))
        with pytest.raises(TransferError, match="already fetched"):
            await answer.fetch(timeout=WAIT)


# -- errors -------------------------------------------------------------------------------------------------------


async def test_error_reply() -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        await session.reply_error(inbound, "busy", "training round 4 for another coordinator")

    async with sessions(handler_b=handler) as pair:
        with pytest.raises(RemoteError) as refused:
            await pair.a.request(train(), timeout=WAIT)
        assert refused.value.code == "busy"
        assert refused.value.remote_message == "training round 4 for another coordinator"
        assert "w1" in refused.value.peer and "busy" in str(refused.value)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DataError("shard unreadable"), "data_error"),
        (StateMismatch("wrong layer"), "state_mismatch"),
        (LimitExceeded("too big"), "limit_exceeded"),
        (RemoteError("quota", "upstream said no"), "quota"),
    ],
)
async def test_handler_fedlink_error_becomes_its_code(error: Exception, code: str) -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        raise error

    async with sessions(handler_b=handler) as pair:
        with pytest.raises(RemoteError) as refused:
            await pair.a.request(train(), timeout=WAIT)
        assert refused.value.code == code
        assert str(error) in refused.value.remote_message


async def test_handler_bug_is_internal_and_session_survives() -> None:
    calls = 0

    async def handler(session: Session, inbound: Inbound) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        await echo(session, inbound)

    async with sessions(handler_b=handler) as pair:
        with pytest.raises(RemoteError) as refused:
            await pair.a.request(train(), state=model_state(), timeout=WAIT)
        assert refused.value.code == "internal"
        assert refused.value.remote_message == "ValueError: boom"
        answer = await pair.a.request(train("again"), timeout=WAIT)
        assert answer.message.task_id == "again"
        assert not pair.a.closed and not pair.b.closed


async def test_no_handler_means_unsupported() -> None:
    async with sessions() as pair:
        with pytest.raises(RemoteError) as refused:
            await pair.a.request(train(), timeout=WAIT)
        assert refused.value.code == "unsupported"


async def test_request_timeout_and_late_answer() -> None:
    release = asyncio.Event()
    replied = asyncio.Event()
    fetch_errors: list[Exception] = []

    async def slow(session: Session, inbound: Inbound) -> None:
        if isinstance(inbound.message, TrainRequest) and inbound.message.task_id == "slow":
            await release.wait()
            try:
                await inbound.fetch(timeout=WAIT)
            except TransferError as exc:
                fetch_errors.append(exc)
            await session.reply(inbound, result_for(inbound.message), state={"late": torch.ones(2000)})
            replied.set()
            return
        await echo(session, inbound)

    async with sessions(handler_a=echo, handler_b=slow) as pair:
        with pytest.raises(RequestTimeout, match="no answer from .* to train within 0.05s"):
            await pair.a.request(train("slow"), state=model_state(), timeout=0.05)
        assert pair.a._outbound == {}, "a timed-out request frees the state it announced"
        release.set()
        await asyncio.wait_for(replied.wait(), WAIT)
        # A request from the worker is read by the coordinator after the late reply, and answered after the
        # coordinator discarded the late reply's state.
        assert (await pair.b.request(train("after"), timeout=WAIT)).message.task_id == "after"
        assert pair.b._outbound == {}, "the late reply's state was discarded"
        assert "no such state" in str(fetch_errors[0])
        assert (await pair.a.request(train("still"), timeout=WAIT)).message.task_id == "still"
        assert not pair.a.closed and not pair.b.closed
        assert pair.tap_b.frames("sent", DataFrame) == []


async def test_request_timeout_covers_a_blocked_send() -> None:
    """A peer that stops reading fills the channel; the request must still give up at its deadline."""
    ours, theirs = memory_pair("session", "stalled", maxsize=1)
    session = Session(ours, peer=WORKER, limits=SMALL, options=SessionOptions(heartbeat_interval=0, close_timeout=0.05))
    session.start()
    try:
        await session.send(Heartbeat())  # fills the one slot; nobody reads it
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(session.request(train(), state=model_state(), timeout=0.05), WAIT)
        assert session._outbound == {} and session._pending == {}
    finally:
        await session.close("test over")


async def test_header_not_describing_the_state_fails_the_fetch() -> None:
    """A sender whose header names a tensor it does not have tells the peer, which would otherwise wait forever."""

    async def handler(session: Session, inbound: Inbound) -> None:
        header = header_of({"w": torch.zeros(3), "b": torch.zeros(1)})
        await session.send(result_for(inbound.message), state={"w": torch.zeros(3)}, header=header, reply_to=inbound)

    async with sessions(handler_b=handler) as pair:
        answer = await pair.a.request(train(), timeout=WAIT)
        with pytest.raises(TransferError, match="state_mismatch: tensor 'b' changed while being sent"):
            await answer.fetch(timeout=None)
        assert not pair.a.closed and not pair.b.closed


async def test_fetch_timeout_frees_the_slot() -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        await session.reply(inbound, result_for(inbound.message), state={"w": torch.arange(4096, dtype=torch.float32)})

    async with sessions(handler_b=handler) as pair:
        pair.tap_b.hold_data = asyncio.Event()
        answer = await pair.a.request(train(), timeout=WAIT)
        with pytest.raises(TransferError, match="incomplete after 0.05s"):
            await answer.fetch(timeout=0.05)
        pair.tap_b.hold_data.set()  # the stale transfer's bytes now arrive and are dropped
        again = await pair.a.request(train(), timeout=WAIT)
        got = await again.fetch(timeout=WAIT)  # the only inbound slot was given back
        assert torch.equal(got["w"], torch.arange(4096, dtype=torch.float32))


# -- a raw peer: what a session does with frames it did not expect ---------------------------------------------------


class TextFrames:
    """A memory channel carries bytes; this end turns marked bytes into the text frame a socket could deliver."""

    MARK = b"\x00text:"

    def __init__(self, inner: MemoryChannel) -> None:
        self.inner = inner
        self.peer = inner.peer

    @classmethod
    def mark(cls, text: str) -> bytes:
        return cls.MARK + text.encode()

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes | str:
        data = await self.inner.recv()
        return data[len(self.MARK) :].decode() if data.startswith(self.MARK) else data

    async def close(self, reason: str = "") -> None:
        await self.inner.close(reason)


@asynccontextmanager
async def raw_peer(
    handler: Callable[[Session, Inbound], Awaitable[None]] | None = echo, *, options: SessionOptions = QUIET
) -> AsyncIterator[tuple[Session, MemoryChannel]]:
    ours, theirs = memory_pair("session", "raw")
    session = Session(TextFrames(ours), peer=WORKER, limits=SMALL, handler=handler, options=options)
    session.start()
    try:
        yield session, theirs
    finally:
        await session.close("test over")


async def test_malformed_frames_get_error_replies_and_session_survives() -> None:
    bad: list[tuple[bytes | str, str]] = [
        (b"\xff\x00", "malformed"),
        ("a text frame", "malformed"),
        (b"", "malformed"),
        (b"\x01\xc1", "malformed"),
        (b"\x01" + msgpack.packb({"v": 1, "type": "nope"}), "malformed"),
        (b"\x01" + msgpack.packb({"v": 2, "type": "heartbeat"}), "version_mismatch"),
        (b"\x02" + b"\x00" * 11, "malformed"),
    ]
    async with raw_peer() as (session, raw):
        for data, code in bad:
            await raw.send(TextFrames.mark(data) if isinstance(data, str) else data)
            told = await recv_frame(raw)
            assert isinstance(told, ErrorMessage) and told.code == code and told.reply_to is None
        await raw.send(encode_message(train("fine").model_copy(update={"id": 41})))
        answer = await recv_frame(raw)
        assert isinstance(answer, TrainResult) and answer.reply_to == 41 and answer.task_id == "fine"
        assert session.counters.malformed == len(bad) and not session.closed


async def test_too_many_malformed_frames_close_the_session() -> None:
    async with raw_peer(options=SessionOptions(heartbeat_interval=0, max_malformed=2)) as (session, raw):
        for _ in range(2):
            await raw.send(b"\x00junk")
            assert isinstance(await recv_frame(raw), ErrorMessage)
        await raw.send(b"\x00junk")
        bye = await recv_frame(raw)
        assert isinstance(bye, Bye) and "too many malformed frames (3)" in bye.reason
        assert "too many malformed" in await asyncio.wait_for(session.wait_closed(), WAIT)
        with pytest.raises(ChannelClosed):
            await raw.recv()


async def test_unexpected_and_stray_frames_are_ignored() -> None:
    async with raw_peer() as (session, raw):
        await raw.send(encode_data(12345, 0, b"stray bytes"))  # no such transfer
        await raw.send(encode_message(TrainResult(id=3, reply_to=999, round=0, task_id="t", update="weights", num_samples=0)))
        await raw.send(encode_message(ErrorMessage(id=4, code="busy", message="unsolicited")))
        await raw.send(encode_message(Discard(id=5, ref=777)))
        await raw.send(encode_message(Heartbeat(id=6)))
        await raw.send(encode_message(Pull(id=7, ref=888)))  # nothing was announced as 888
        told = await recv_frame(raw)
        assert isinstance(told, ErrorMessage) and told.code == "transfer_failed" and told.ref == 888
        await raw.send(encode_message(train("ok").model_copy(update={"id": 8})))
        answer = await recv_frame(raw)
        assert isinstance(answer, TrainResult) and answer.reply_to == 8
        assert session.counters.malformed == 0 and not session.closed


async def _announce_to(session: Session, raw: MemoryChannel, header: StateHeader) -> tuple[asyncio.Task[State], int]:
    """Make ``session`` fetch a state the raw peer announced; returns the fetch and the announcing message's id."""
    request = asyncio.ensure_future(session.request(train(), timeout=WAIT))
    sent = await recv_frame(raw)
    assert isinstance(sent, TrainRequest)
    reply = result_for(sent).model_copy(update={"id": 50, "reply_to": sent.id, "state": header})
    await raw.send(encode_message(reply))
    answer = await request
    fetch = asyncio.ensure_future(answer.fetch(timeout=WAIT))
    pull = await recv_frame(raw)
    assert isinstance(pull, Pull) and pull.ref == 50
    return fetch, 50


HEADER_8 = StateHeader(tensors=(TensorSpec(name="w", dtype="int32", shape=(2,)),))


async def test_raw_transfer_in_order() -> None:
    async with raw_peer() as (session, raw):
        fetch, ref = await _announce_to(session, raw, HEADER_8)
        await raw.send(encode_data(ref, 0, b"\x01\x00\x00"))
        await raw.send(encode_data(ref, 1, b"\x00\x02\x00\x00\x00"))
        assert torch.equal((await fetch)["w"], torch.tensor([1, 2], dtype=torch.int32))


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([(1, b"\x00" * 8)], "out of order"),
        ([(0, b"\x00" * 4), (0, b"\x00" * 4)], "out of order"),
        ([(0, b"\x00" * 9)], "more bytes than the header announced"),
    ],
    ids=["skips-a-chunk", "repeats-a-chunk", "too-many-bytes"],
)
async def test_raw_transfer_broken(frames: list[tuple[int, bytes]], match: str) -> None:
    async with raw_peer() as (session, raw):
        fetch, ref = await _announce_to(session, raw, HEADER_8)
        for seq, payload in frames:
            await raw.send(encode_data(ref, seq, payload))
        with pytest.raises(TransferError, match=match):
            await fetch
        assert not session.closed


async def test_raw_transfer_refused_by_sender() -> None:
    async with raw_peer() as (session, raw):
        fetch, ref = await _announce_to(session, raw, HEADER_8)
        await raw.send(encode_message(ErrorMessage(id=60, code="transfer_failed", ref=ref, message="tensor changed")))
        with pytest.raises(TransferError, match="could not send state: transfer_failed: tensor changed"):
            await fetch


async def test_sender_reports_a_state_that_changed() -> None:
    async with raw_peer() as (session, raw):
        state = {"w": torch.zeros(4)}
        sent = await session.send(train(), state=state, header=header_of({"w": torch.zeros(5)}))
        assert await recv_frame(raw) == sent
        await raw.send(encode_message(Pull(id=1, ref=sent.id)))
        told = await recv_frame(raw)
        assert isinstance(told, ErrorMessage) and told.code == "state_mismatch" and told.ref == sent.id
        assert not session.closed


# -- heartbeats ---------------------------------------------------------------------------------------------------


async def test_heartbeat_timeout_closes_a_silent_session() -> None:
    ours, silent = memory_pair("session", "silent")  # the other end never starts a session
    options = SessionOptions(heartbeat_interval=0.01, heartbeat_timeout=0.05)
    session = Session(ours, peer=WORKER, limits=SMALL, options=options)
    session.start()
    pending = asyncio.ensure_future(session.request(train(), timeout=WAIT))
    reason = await asyncio.wait_for(session.wait_closed(), WAIT)
    assert reason.startswith("nothing heard from worker 'w1'")
    with pytest.raises(SessionClosed):
        await pending
    frames = []
    while True:  # what the silent peer was sent: the request, heartbeats, then goodbye
        try:
            frames.append(await recv_frame(silent))
        except ChannelClosed:
            break
    assert isinstance(frames[0], TrainRequest) and isinstance(frames[-1], Bye)
    assert all(isinstance(f, Heartbeat) for f in frames[1:-1])


async def test_heartbeats_keep_an_idle_session_alive() -> None:
    options = SessionOptions(heartbeat_interval=0.01, heartbeat_timeout=0.3)
    async with sessions(options_a=options, options_b=options) as pair:
        enough = 40  # 40 heartbeats each way take longer than the timeout
        await pair.tap_a.until(lambda: len(pair.tap_a.frames("recv", Heartbeat)) >= enough)
        await pair.tap_b.until(lambda: len(pair.tap_b.frames("recv", Heartbeat)) >= enough)
        assert not pair.a.closed and not pair.b.closed


# -- closing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("closer", ["requester", "handler side"])
async def test_closing_fails_pending_requests(closer: str) -> None:
    started = asyncio.Event()

    async def stuck(session: Session, inbound: Inbound) -> None:
        started.set()
        await asyncio.Event().wait()  # never answers; cancelled when its session closes

    async with sessions(handler_b=stuck) as pair:
        pending = [asyncio.ensure_future(pair.a.request(train(str(i)), timeout=None)) for i in range(3)]
        await asyncio.wait_for(started.wait(), WAIT)
        await (pair.a if closer == "requester" else pair.b).close("maintenance")
        for request in pending:
            with pytest.raises(SessionClosed, match="maintenance"):
                await request
        await asyncio.wait_for(pair.a.wait_closed(), WAIT)
        await asyncio.wait_for(pair.b.wait_closed(), WAIT)
        other = pair.b if closer == "requester" else pair.a
        assert other.close_reason == "peer said goodbye (maintenance)"
        with pytest.raises(SessionClosed):
            await pair.a.request(train(), timeout=WAIT)
        with pytest.raises(SessionClosed):
            await pair.b.send(Heartbeat())
        assert pair.a._pending == {}


@pytest.mark.parametrize("closer", ["fetcher", "sender"])
async def test_closing_fails_a_transfer_under_way(closer: str) -> None:
    async def handler(session: Session, inbound: Inbound) -> None:
        await session.reply(inbound, result_for(inbound.message), state=model_state())

    async with sessions(handler_b=handler) as pair:
        pair.tap_b.hold_data = asyncio.Event()  # the worker's bytes never leave
        answer = await pair.a.request(train(), timeout=WAIT)
        fetch = asyncio.ensure_future(answer.fetch(timeout=WAIT))
        await pair.tap_b.until(lambda: len(pair.tap_b.frames("recv", Pull)) == 1)
        await (pair.a if closer == "fetcher" else pair.b).close("going away")
        with pytest.raises(SessionClosed):
            await fetch
        assert pair.a._transfers == {}


async def test_connection_lost_closes_the_session() -> None:
    async with sessions(handler_b=echo) as pair:
        await pair.tap_a.inner.close()  # the connection drops: no goodbye
        assert (await asyncio.wait_for(pair.b.wait_closed(), WAIT)).startswith("connection lost")
        assert (await asyncio.wait_for(pair.a.wait_closed(), WAIT)).startswith("connection lost")


async def test_close_is_idempotent() -> None:
    async with sessions() as pair:
        await pair.a.close("first")
        await pair.a.close("second")
        assert pair.a.close_reason == "first"
        assert len(pair.tap_a.frames("sent", Bye)) == 1


# -- concurrency --------------------------------------------------------------------------------------------------


async def test_concurrent_requests_get_matching_replies() -> None:
    count = 20
    arrived = 0
    all_arrived = asyncio.Event()
    gates = {str(i): asyncio.Event() for i in range(count)}

    async def handler(session: Session, inbound: Inbound) -> None:
        nonlocal arrived
        assert isinstance(inbound.message, TrainRequest)
        arrived += 1
        if arrived == count:
            all_arrived.set()
        await gates[inbound.message.task_id].wait()
        state = await inbound.fetch(timeout=WAIT)
        await session.reply(inbound, result_for(inbound.message), state={"echo": state["x"] * 2})

    # b answers all 20 before a pulls any: b must be allowed to hold them all (the default holds 4 results).
    options_b = SessionOptions(heartbeat_interval=0, inbound_slots=4, max_outbound=count)
    async with sessions(handler_b=handler, options_b=options_b) as pair:
        async def one(i: int) -> tuple[str, torch.Tensor]:
            answer = await pair.a.request(train(str(i), round=i), state={"x": torch.full((100,), float(i))}, timeout=WAIT)
            assert isinstance(answer.message, TrainResult) and answer.message.round == i
            return answer.message.task_id, (await answer.fetch(timeout=WAIT))["echo"]

        requests = [asyncio.ensure_future(one(i)) for i in range(count)]
        await asyncio.wait_for(all_arrived.wait(), WAIT)
        for i in reversed(range(count)):  # answer in the opposite order
            gates[str(i)].set()
        results = await asyncio.gather(*requests)
        for i, (task_id, echoed) in enumerate(results):
            assert task_id == str(i)
            assert torch.equal(echoed, torch.full((100,), 2.0 * i))


def _transfers_in_order(tap: Tap) -> list[tuple[str, int]]:
    """The fetching side's view: ('pull', ref) when it asked, ('data', ref) for each chunk it received."""
    events = []
    for direction, frame in tap.log:
        if direction == "sent" and isinstance(frame, Pull):
            events.append(("pull", frame.ref))
        elif direction == "recv" and isinstance(frame, DataFrame):
            events.append(("data", frame.ref))
    return events


async def _two_concurrent_fetches(slots: int, hold: bool) -> list[tuple[str, int]]:
    state = {"w": torch.randn(16384)}  # 64 KiB: 16 chunks of 4 KiB
    both_pulled = asyncio.Event()

    async def handler(session: Session, inbound: Inbound) -> None:
        got = await inbound.fetch(timeout=WAIT)
        assert torch.equal(got["w"], state["w"])
        await echo(session, inbound)

    options_b = SessionOptions(heartbeat_interval=0, inbound_slots=slots)
    async with sessions(handler_b=handler, options_b=options_b) as pair:
        if hold:  # no byte leaves until both fetches asked: only possible when they may overlap
            pair.tap_a.hold_data = both_pulled

            async def release() -> None:
                await pair.tap_b.until(lambda: len(pair.tap_b.frames("sent", Pull)) == 2)
                both_pulled.set()

            releaser = asyncio.ensure_future(release())
        await asyncio.gather(*(pair.a.request(train(str(i)), state=state, timeout=WAIT) for i in range(2)))
        if hold:
            await releaser
        return _transfers_in_order(pair.tap_b)


async def test_one_inbound_slot_means_fetches_do_not_overlap() -> None:
    events = await _two_concurrent_fetches(slots=1, hold=False)
    first, second = events[0][1], events[-1][1]
    assert first != second
    assert events == [("pull", first)] + [("data", first)] * 16 + [("pull", second)] + [("data", second)] * 16


async def test_two_inbound_slots_let_fetches_overlap() -> None:
    """The counterpart of the test above, showing that its observation can see an overlap."""
    events = await _two_concurrent_fetches(slots=2, hold=True)
    assert [e for e in events[:2]] == [("pull", events[0][1]), ("pull", events[1][1])]
    assert len(events) == 34


# -- the in-memory channel itself ---------------------------------------------------------------------------------


async def test_memory_channel() -> None:
    one, two = memory_pair("one", "two")
    assert (one.peer, two.peer) == ("two", "one")
    await one.send(b"first")
    await one.send(bytearray(b"second"))  # type: ignore[arg-type]
    assert await two.recv() == b"first"
    await two.close()
    assert await two.recv() == b"second", "what was sent before the close is still delivered"
    for end in (one, two):
        with pytest.raises(ChannelClosed):
            await end.recv()
        with pytest.raises(ChannelClosed):
            await end.send(b"late")
    await one.close()  # idempotent


async def test_memory_channel_close_wakes_a_blocked_sender_and_receiver() -> None:
    one, two = memory_pair(maxsize=1)
    await one.send(b"fills the queue")
    blocked_send = asyncio.ensure_future(one.send(b"waits"))
    blocked_recv = asyncio.ensure_future(one.recv())
    await asyncio.wait({blocked_send, blocked_recv}, timeout=0.01)
    assert not blocked_send.done() and not blocked_recv.done()
    await two.close()
    for blocked in (blocked_send, blocked_recv):
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(blocked, WAIT)

