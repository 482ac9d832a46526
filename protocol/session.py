"""A session: requests and replies, state transfers and heartbeats over one :class:`~.channel.Channel`.

Nothing here knows which side dialled: once both :class:`~.messages.Hello` messages are exchanged
(:func:`handshake`), coordinator and worker hold the same :class:`Session` type, and either may send requests.

Model states are announced, then pulled (see :mod:`.messages`): the receiver calls :meth:`Session.fetch` when it
is ready, which bounds how many states it takes in at once (``inbound_slots``), and the sender reads the bytes
from the tensors only then, chunk by chunk, so a state shared by many sends is never copied whole.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import torch

from ..display import safe
from ..errors import FedlinkError
from .auth import ADVICE, Keyring, Secret, check_proof, make_proof, new_nonce, transcript
from .channel import Channel, ChannelClosed, PreauthLimited
from .errors import (
    AuthenticationFailed,
    HandshakeFailed,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    SessionClosed,
    TransferError,
    VersionMismatch,
)
from .frames import DataFrame, decode_frame, encode_data, encode_message
from .limits import Limits
from .messages import AUTH_SCHEME, AuthChallenge, AuthProof, Bye, Discard, ErrorMessage, Heartbeat, Hello, Message, Pull
from .spill import Spill, SpillAssembler, SpilledState
from .tensors import State, StateAssembler, StateHeader, check_header, header_of, iter_state_pieces

__all__ = ["Session", "Inbound", "RequestHandler", "handshake", "SessionOptions"]

log = logging.getLogger("fedlink.protocol.session")

M = TypeVar("M", bound=Message)
_A = TypeVar("_A", AuthChallenge, AuthProof)


@dataclass(frozen=True)
class SessionOptions:
    """Timing and bounds of a session; the defaults suit both loopback and slow wide-area links.

    ``outbound_ttl`` (at most an hour) and ``max_outbound`` bound what a peer that never pulls can make us hold:
    at most ``max_outbound`` announced results (states not announced by our own requests) per session, the oldest
    dropped (with a warning) for a new one.
    """

    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    inbound_slots: int = 1
    outbound_ttl: float = 3600.0
    max_outbound: int = 4
    max_malformed: int = 32
    close_timeout: float = 2.0

    def __post_init__(self) -> None:
        bounds: dict[str, tuple[float, float]] = {
            "heartbeat_interval": (0.0, 3600.0),  # 0: send none
            "heartbeat_timeout": (0.001, 86400.0),
            "inbound_slots": (1, 64),
            "outbound_ttl": (0.001, 3600.0),
            "max_outbound": (1, 64),
            "max_malformed": (0, 10_000),
            "close_timeout": (0.001, 60.0),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:  # also refuses NaN
                raise ValueError(f"SessionOptions.{name} = {value!r}: expected {low:g} to {high:g}")


@dataclass(eq=False)
class Inbound:
    """A message received from the peer; its announced state (if any) stays with the peer until fetched."""

    message: Message
    session: "Session"
    fetched: bool = False
    discarded: bool = False

    @property
    def state_header(self) -> StateHeader | None:
        return self.message.state

    async def fetch(self, *, expected: StateHeader | None = None, timeout: float | None = None) -> State:
        return await self.session.fetch(self, expected=expected, timeout=timeout)

    async def fetch_spilled(
        self, spill: Spill, *, expected: StateHeader | None = None, timeout: float | None = None
    ) -> SpilledState:
        return await self.session.fetch_spilled(self, spill, expected=expected, timeout=timeout)

    async def discard(self) -> None:
        await self.session.discard(self)


RequestHandler = Callable[["Session", Inbound], Awaitable[None]]


@dataclass
class _Outbound:
    state: Mapping[str, torch.Tensor]
    header: StateHeader
    expiry: asyncio.TimerHandle | None = None
    result: bool = True  # not announced by one of our requests (those end with the request's own deadline)


@dataclass
class _Transfer:
    assembler: StateAssembler | SpillAssembler
    future: asyncio.Future[State | SpilledState]
    next_seq: int = 0


@dataclass
class _Counters:
    malformed: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    extra: dict[str, int] = field(default_factory=dict)


async def handshake(
    channel: Channel,
    hello: Hello,
    *,
    limits: Limits,
    timeout: float,
    keyring: Keyring | None = None,
    initiator: bool = False,
) -> Hello:
    """Exchange hellos (both sides send first, so it works whichever side dialled) and return the peer's.

    With a ``keyring``, our hello says that we require authentication, and the handshake goes on with the
    challenge-response of :mod:`.auth`: both sides must hold the same token, and a side with a token refuses a
    side without one (both report it). ``initiator`` is True on the side that dialled: it proves first.
    ``timeout`` bounds the whole exchange.

    Raises :class:`VersionMismatch` / :class:`HandshakeFailed` (:class:`AuthenticationFailed` for anything about
    tokens) / :class:`RemoteError`; the caller closes the channel. The peer is told why before we give up, so both
    sides log the same reason.
    """
    if keyring:
        hello = hello.model_copy(update={"auth": AUTH_SCHEME})
    else:
        # Nothing to authenticate: a stranger can open a session anyway, so small frames would protect nothing.
        # Lifted before our hello, so that no frame the peer sends after reading it can meet the small limits.
        _lift(channel)
    mine = encode_message(hello)
    stage = "hello"
    try:
        async with asyncio.timeout(timeout):
            await channel.send(mine)
            theirs = await channel.recv()
            peer = await _check_hello(channel, hello, theirs, limits)
            if not keyring and peer.auth is None:
                return peer
            stage = "authentication"
            assert not isinstance(theirs, str)  # a text frame is no hello: _check_hello refused it
            await _authenticate(
                channel, hello, mine, peer, bytes(theirs), limits=limits, keyring=keyring, initiator=initiator
            )
            return peer
    except TimeoutError as exc:
        raise HandshakeFailed(f"no {stage} from {channel.peer} within {timeout:g}s") from exc
    except ChannelClosed as exc:
        raise HandshakeFailed(f"{channel.peer} closed the connection during the handshake ({exc})") from exc


def _lift(channel: Channel) -> None:
    if isinstance(channel, PreauthLimited):
        channel.lift_preauth_limits()


async def _check_hello(channel: Channel, hello: Hello, data: bytes | str, limits: Limits) -> Hello:
    try:
        frame = decode_frame(data, limits, preauth=True)
    except ProtocolError as exc:
        await _tell(channel, ErrorMessage(code=exc.code, message=str(exc)))
        if isinstance(exc, VersionMismatch):
            raise
        raise HandshakeFailed(f"bad hello from {channel.peer}: {exc}") from exc
    if isinstance(frame, ErrorMessage):
        raise RemoteError(frame.code, frame.message, peer=channel.peer)
    if not isinstance(frame, Hello):
        problem = f"expected hello from {channel.peer}, got {getattr(frame, 'type', 'data')!r}"
        await _tell(channel, ErrorMessage(code="handshake_failed", message=problem))
        raise HandshakeFailed(problem)
    if frame.role == hello.role:
        problem = f"{channel.peer} is a {frame.role} too; a session joins a coordinator and a worker"
        await _tell(channel, ErrorMessage(code="handshake_failed", message=problem))
        raise HandshakeFailed(problem)
    return frame


async def _refuse(channel: Channel, problem: str, *, told: str | None = None) -> NoReturn:
    """Tell the peer (``told``, or the same words) and raise :class:`AuthenticationFailed` with ``problem``."""
    await _tell(channel, ErrorMessage(code=AuthenticationFailed.code, message=told if told is not None else problem))
    raise AuthenticationFailed(problem)


async def _authenticate(
    channel: Channel,
    hello: Hello,
    mine: bytes,
    peer: Hello,
    theirs: bytes,
    *,
    limits: Limits,
    keyring: Keyring | None,
    initiator: bool,
) -> None:
    """The challenge-response of :mod:`.auth`, once both hellos are in; returns only when the peer proved itself."""
    who = f"{peer.role} {peer.peer_id!r} ({channel.peer})"
    if not keyring:
        await _refuse(
            channel,
            f"{who} requires a token, this {hello.role} has none: {ADVICE[hello.role]}",
            told=f"this {hello.role} has no token, but you require one: {ADVICE[hello.role]}",
        )
    assert keyring is not None
    if peer.auth is None:
        await _refuse(
            channel,
            f"{who} has no token, but this {hello.role} requires one: {ADVICE[peer.role]}",
            told=f"this {hello.role} requires a token and you have none: {ADVICE[peer.role]}",
        )
    secret = keyring.for_peer(peer.peer_id)
    unknown = secret is None
    if secret is None:
        # An id without a token goes through the very same exchange as a known one, with a key nobody holds, and
        # fails at the same step with the same words: which ids have tokens is nobody else's business.
        secret = Secret(new_nonce(), origin="no token (unknown id)")
    nonce = new_nonce()
    await channel.send(encode_message(AuthChallenge(nonce=nonce.hex())))
    challenge = await _expect(channel, AuthChallenge, limits, who)
    peer_nonce = bytes.fromhex(challenge.nonce)
    if hmac.compare_digest(peer_nonce, nonce):
        await _refuse(channel, f"{who} sent back our own challenge", told=_NOT_PROVED)
    if hello.role == "coordinator":
        text = transcript(coordinator_hello=mine, worker_hello=theirs, coordinator_nonce=nonce, worker_nonce=peer_nonce)
    else:
        text = transcript(coordinator_hello=theirs, worker_hello=mine, coordinator_nonce=peer_nonce, worker_nonce=nonce)
    ours = AuthProof(mac=make_proof(secret, hello.role, text).hex())
    if initiator:
        # The listener's proof is the last frame it sends before the session: lifted now, no later frame of the
        # listener can meet the small limits. (It is still decoded with the pre-authentication bounds.)
        _lift(channel)
        await channel.send(encode_message(ours))
    proof = await _expect(channel, AuthProof, limits, who)
    if not check_proof(secret, peer.role, text, bytes.fromhex(proof.mac)) or unknown:
        await _refuse(
            channel,
            f"no token for {who}{': ' + keyring.missing if keyring.missing else ''}" if unknown else
            f"{who} did not prove that it holds the token from {secret.origin} (a different token, or a replayed "
            "or altered handshake); give both sides the same token",
            told=_NOT_PROVED,
        )
    if not initiator:
        # The dialler proved itself: its next frames (a request, a state header) may be large.
        _lift(channel)
        await channel.send(encode_message(ours))


_NOT_PROVED = (
    "authentication failed: your proof does not match this side's token for you; both sides must hold the same token"
)


async def _expect(channel: Channel, kind: type[_A], limits: Limits, who: str) -> _A:
    """The next frame, which must be a ``kind``; the peer's own refusal becomes our error with its words."""
    data = await channel.recv()
    try:
        frame = decode_frame(data, limits, preauth=True)
    except ProtocolError as exc:
        await _tell(channel, ErrorMessage(code=exc.code, message=str(exc)))
        raise HandshakeFailed(f"bad {kind.__name__} from {who}: {exc}") from exc
    if isinstance(frame, ErrorMessage):
        if frame.code == AuthenticationFailed.code:
            raise AuthenticationFailed(f"{who} refused us: {safe(frame.message)}")
        raise RemoteError(frame.code, frame.message, peer=channel.peer)
    if not isinstance(frame, kind):
        problem = f"expected {kind.__name__} from {who}, got {getattr(frame, 'type', 'data')!r}"
        await _tell(channel, ErrorMessage(code="handshake_failed", message=problem))
        raise HandshakeFailed(problem)
    return frame


async def _tell(channel: Channel, message: ErrorMessage) -> None:
    if len(message.message) > 1024:  # fits the peer's pre-authentication frame limit
        message = message.model_copy(update={"message": message.message[:1024]})
    try:
        async with asyncio.timeout(1.0):
            await channel.send(encode_message(message))
    except (TimeoutError, ChannelClosed):
        pass


class Session:
    """Requests, replies and transfers with one peer. Call :meth:`start` once, :meth:`close` when done."""

    def __init__(
        self,
        channel: Channel,
        *,
        peer: Hello,
        limits: Limits,
        handler: RequestHandler | None = None,
        options: SessionOptions | None = None,
        name: str = "",
    ) -> None:
        self.channel = channel
        self.peer_hello = peer
        self.peer = f"{peer.role} {peer.peer_id!r} ({channel.peer})"
        self.limits = limits
        self.options = options or SessionOptions()
        self.name = name
        self._handler = handler
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Inbound]] = {}
        self._outbound: dict[int, _Outbound] = {}
        self._transfers: dict[int, _Transfer] = {}
        self._slots = asyncio.Semaphore(self.options.inbound_slots)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self.close_reason = ""
        self.counters = _Counters()
        self._loop = asyncio.get_running_loop()
        self._last_seen = self._loop.time()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._read_loop())
        if self.options.heartbeat_interval > 0:
            self._spawn(self._heartbeat_loop())

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> str:
        await self._closed.wait()
        return self.close_reason

    async def close(self, reason: str = "closed") -> None:
        """Say goodbye, close the channel, fail everything still waiting with :class:`SessionClosed`."""
        if self.closed:
            return
        try:
            async with asyncio.timeout(self.options.close_timeout):
                await self.channel.send(encode_message(Bye(id=next(self._ids), reason=reason[:1024])))
        except (TimeoutError, ChannelClosed):
            pass
        await self._shutdown(reason)

    async def _shutdown(self, reason: str) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self._closed.set()
        error = SessionClosed(f"session with {self.peer} closed: {reason}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for transfer in self._transfers.values():
            if not transfer.future.done():
                transfer.future.set_exception(error)
        for out in self._outbound.values():
            if out.expiry is not None:
                out.expiry.cancel()
        self._outbound.clear()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        try:
            await self.channel.close(reason)
        except Exception:  # noqa: BLE001 - closing a dead connection may fail in any way; it is gone either way
            log.debug("closing channel to %s failed", self.peer, exc_info=True)
        log.debug("session with %s closed: %s", self.peer, reason)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- sending -----------------------------------------------------------------------------------------------

    async def _send_frame(self, data: bytes) -> None:
        if self.closed:
            raise SessionClosed(f"session with {self.peer} is closed: {self.close_reason}")
        try:
            await self.channel.send(data)
        except ChannelClosed as exc:
            await self._shutdown(f"connection lost ({exc})")
            raise SessionClosed(f"connection to {self.peer} lost while sending") from exc
        self.counters.bytes_out += len(data)

    async def send(
        self,
        message: M,
        *,
        state: Mapping[str, torch.Tensor] | None = None,
        header: StateHeader | None = None,
        reply_to: Inbound | None = None,
    ) -> M:
        """Send ``message``, announcing ``state`` (the peer pulls it later). Returns the message as sent."""
        return await self._send_message(message, next(self._ids), state=state, header=header, reply_to=reply_to)

    async def _send_message(
        self,
        message: M,
        msg_id: int,
        *,
        state: Mapping[str, torch.Tensor] | None,
        header: StateHeader | None = None,
        reply_to: Inbound | None = None,
    ) -> M:
        update: dict[str, object] = {"id": msg_id}
        if reply_to is not None:
            update["reply_to"] = reply_to.message.id
        if state is not None:
            header = header or header_of(state)
            update["state"] = header
            result = msg_id not in self._pending
            if result:
                self._bound_outbound()
            out = _Outbound(state=state, header=header, result=result)
            out.expiry = self._loop.call_later(self.options.outbound_ttl, self._outbound.pop, msg_id, None)
            self._outbound[msg_id] = out
        sent = message.model_copy(update=update)
        try:
            await self._send_frame(encode_message(sent))
        except BaseException:
            self._drop_outbound(msg_id)
            raise
        return sent

    def _bound_outbound(self) -> None:
        """Make room for one more announced result: a peer that never pulls makes us hold at most ``max_outbound``
        (states announced by our own requests are bounded by the requests' deadlines instead)."""
        results = [msg_id for msg_id, out in self._outbound.items() if out.result]
        while len(results) >= self.options.max_outbound:
            oldest = results.pop(0)
            log.warning(
                "dropping state %d announced to %s: %d results are waiting to be pulled, the most kept is %d",
                oldest, self.peer, len(results) + 1, self.options.max_outbound,
            )
            self._drop_outbound(oldest)

    def _drop_outbound(self, msg_id: int) -> None:
        out = self._outbound.pop(msg_id, None)
        if out is not None and out.expiry is not None:
            out.expiry.cancel()

    async def reply(self, to: Inbound, message: M, *, state: Mapping[str, torch.Tensor] | None = None) -> M:
        return await self.send(message, state=state, reply_to=to)

    async def reply_error(self, to: Inbound, code: str, text: str) -> None:
        try:
            await self.send(ErrorMessage(code=code, message=text[:4096]), reply_to=to)
        except SessionClosed:
            log.info("could not tell %s about %s: session closed", self.peer, code)

    async def request(
        self,
        message: Message,
        *,
        state: Mapping[str, torch.Tensor] | None = None,
        header: StateHeader | None = None,
        timeout: float | None,
    ) -> Inbound:
        """Send ``message`` and wait for the peer's answer; an ``error`` answer raises :class:`RemoteError`."""
        msg_id = next(self._ids)
        future: asyncio.Future[Inbound] = self._loop.create_future()
        self._pending[msg_id] = future
        try:
            # The deadline covers sending too: a peer that stops reading must not hold a request past it.
            async with asyncio.timeout(timeout):
                await self._send_message(message, msg_id, state=state, header=header)
                # The outbound transfer holds the state until the peer pulls it; this frame must not hold it while
                # the peer works (a FedBuff worker trains on a model the coordinator has since replaced).
                state = None
                answer = await future
        except TimeoutError as exc:
            self._drop_outbound(msg_id)
            raise RequestTimeout(
                f"no answer from {self.peer} to {getattr(message, 'type', 'request')} within {timeout:g}s"
            ) from exc
        except asyncio.CancelledError:
            # Abandoned by the caller (its own deadline, the run ending): no one waits for the peer any more, so
            # nothing keeps the state for it either.
            self._drop_outbound(msg_id)
            raise
        finally:
            self._pending.pop(msg_id, None)
        if isinstance(answer.message, ErrorMessage):
            raise RemoteError(answer.message.code, answer.message.message, peer=self.peer)
        return answer

    # -- state transfers ---------------------------------------------------------------------------------------

    async def fetch(
        self, inbound: Inbound, *, expected: StateHeader | None = None, timeout: float | None = None
    ) -> State:
        """Pull the state announced by ``inbound``; checks limits and ``expected`` before any byte moves."""
        state = await self._pull(inbound, StateAssembler, expected=expected, timeout=timeout)
        assert isinstance(state, dict)
        return state

    async def fetch_spilled(
        self, inbound: Inbound, spill: Spill, *, expected: StateHeader | None = None, timeout: float | None = None
    ) -> SpilledState:
        """As :meth:`fetch`, but the bytes go to a temporary file as they arrive (:mod:`fedlink.protocol.spill`)."""
        state = await self._pull(
            inbound, lambda header: SpillAssembler(header, spill), expected=expected, timeout=timeout
        )
        assert isinstance(state, SpilledState)
        return state

    async def _pull(
        self,
        inbound: Inbound,
        assemble: Callable[[StateHeader], StateAssembler | SpillAssembler],
        *,
        expected: StateHeader | None,
        timeout: float | None,
    ) -> State | SpilledState:
        header = inbound.message.state
        if header is None:
            raise TransferError(f"{inbound.message.type} from {self.peer} carries no model state")
        if inbound.fetched or inbound.discarded:
            raise TransferError("state already fetched or discarded")
        try:
            check_header(header, self.limits, expected=expected)
        except ProtocolError:
            await self.discard(inbound)
            raise
        inbound.fetched = True
        ref = inbound.message.id
        async with self._slots:
            assembler = assemble(header)
            transfer = _Transfer(assembler, self._loop.create_future())
            self._transfers[ref] = transfer
            succeeded = False
            try:
                await self._send_frame(encode_message(Pull(id=next(self._ids), ref=ref)))
                if assembler.done:
                    received = assembler.result()
                else:
                    async with asyncio.timeout(timeout):
                        received = await transfer.future
                succeeded = True
                return received
            except TimeoutError as exc:
                raise TransferError(
                    f"state from {self.peer} incomplete after {timeout:g}s "
                    f"({assembler.received} of {header.nbytes} bytes)"
                ) from exc
            finally:
                self._transfers.pop(ref, None)
                if not succeeded and isinstance(assembler, SpillAssembler):
                    assembler.close()

    async def discard(self, inbound: Inbound) -> None:
        """Tell the peer we will not pull the state ``inbound`` announced, so it can free it."""
        if inbound.message.state is None or inbound.fetched or inbound.discarded:
            return
        inbound.discarded = True
        try:
            await self._send_frame(encode_message(Discard(id=next(self._ids), ref=inbound.message.id)))
        except SessionClosed:
            pass

    async def _stream(self, ref: int) -> None:
        out = self._outbound.pop(ref, None)
        if out is None:
            await self._send_frame(
                encode_message(
                    ErrorMessage(
                        id=next(self._ids), code="transfer_failed", ref=ref, message="no such state (expired or dropped?)"
                    )
                )
            )
            return
        if out.expiry is not None:
            out.expiry.cancel()
        try:
            chunks = iter_state_pieces(out.state, out.header, self.limits.chunk_bytes)
            for seq, pieces in enumerate(chunks):
                await self._send_frame(encode_data(ref, seq, pieces))
        except ProtocolError as exc:
            log.warning("sending state %d to %s failed: %s", ref, self.peer, exc)
            if not self.closed:
                await self._send_frame(
                    encode_message(ErrorMessage(id=next(self._ids), code=exc.code, ref=ref, message=str(exc)))
                )

    def _on_data(self, frame: DataFrame) -> None:
        transfer = self._transfers.get(frame.ref)
        if transfer is None or transfer.future.done():
            log.debug("dropping data frame for unknown state %d from %s", frame.ref, self.peer)
            return
        try:
            if frame.seq != transfer.next_seq:
                raise TransferError(f"data frame {frame.seq} out of order (expected {transfer.next_seq})")
            transfer.next_seq += 1
            transfer.assembler.feed(frame.payload)
        except ProtocolError as exc:
            transfer.future.set_exception(TransferError(f"state from {self.peer}: {exc}"))
            return
        if transfer.assembler.done:
            transfer.future.set_result(transfer.assembler.result())

    # -- receiving ---------------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                data = await self.channel.recv()
                self._last_seen = self._loop.time()
                self.counters.frames_in += 1
                self.counters.bytes_in += len(data)
                try:
                    frame = decode_frame(data, self.limits)
                except ProtocolError as exc:
                    if await self._on_malformed(exc):
                        return
                    continue
                if isinstance(frame, DataFrame):
                    self._on_data(frame)
                elif isinstance(frame, Bye):
                    reason = f"peer said goodbye ({frame.reason})" if frame.reason else "peer said goodbye"
                    break
                else:
                    await self._on_message(frame)
        except ChannelClosed as exc:
            reason = f"connection lost ({exc})"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must end this session, never the daemon
            log.exception("session with %s failed", self.peer)
            reason = f"internal error: {exc}"
        await self._shutdown(reason)

    async def _on_malformed(self, exc: ProtocolError) -> bool:
        """Answer a bad frame with an error; returns True when the peer sent too many and was dropped."""
        self.counters.malformed += 1
        log.warning("bad frame from %s: %s", self.peer, exc)
        if self.counters.malformed > self.options.max_malformed:
            await self.close(f"too many malformed frames ({self.counters.malformed})")
            return True
        try:
            await self._send_frame(encode_message(ErrorMessage(id=next(self._ids), code=exc.code, message=str(exc))))
        except SessionClosed:
            return True
        return False

    async def _on_message(self, message: Message) -> None:
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, Pull):
            self._spawn(self._stream_guarded(message.ref))
            return
        if isinstance(message, Discard):
            self._drop_outbound(message.ref)
            return
        if isinstance(message, ErrorMessage) and message.ref is not None and message.reply_to is None:
            transfer = self._transfers.get(message.ref)
            if transfer is not None and not transfer.future.done():
                transfer.future.set_exception(
                    TransferError(f"{self.peer} could not send state: {safe(message.code)}: {safe(message.message)}")
                )
            return
        inbound = Inbound(message=message, session=self)
        if message.reply_to is not None:
            future = self._pending.get(message.reply_to)
            if future is None or future.done():
                log.info("discarding late or unexpected %s from %s", message.type, self.peer)
                await self.discard(inbound)
                return
            future.set_result(inbound)
            return
        if isinstance(message, ErrorMessage):
            log.warning("%s reports %s: %s", self.peer, safe(message.code), safe(message.message))
            return
        if self._handler is None:
            await self.reply_error(inbound, "unsupported", f"{message.type} is not served here")
            return
        self._spawn(self._handle(inbound))

    async def _stream_guarded(self, ref: int) -> None:
        try:
            await self._stream(ref)
        except SessionClosed:
            pass

    async def _handle(self, inbound: Inbound) -> None:
        assert self._handler is not None
        try:
            await self._handler(self, inbound)
        except SessionClosed:
            return
        except FedlinkError as exc:
            code = getattr(exc, "code", "failed")
            log.warning("%s from %s refused: %s", inbound.message.type, self.peer, exc)
            await self.reply_error(inbound, code if isinstance(code, str) else "failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the daemon down
            log.exception("handling %s from %s failed", inbound.message.type, self.peer)
            await self.reply_error(inbound, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            await self.discard(inbound)

    async def _heartbeat_loop(self) -> None:
        # Each side says in its hello how often it wants to hear from the other; honour the stricter of the two.
        interval = min(self.options.heartbeat_interval, self.peer_hello.heartbeat)
        while not self.closed:
            await asyncio.sleep(interval)
            silent = self._loop.time() - self._last_seen
            if silent > self.options.heartbeat_timeout:
                await self.close(f"nothing heard from {self.peer} for {silent:.0f}s")
                return
            try:
                # A peer that stopped reading would block this send forever; that is silence too.
                async with asyncio.timeout(self.options.heartbeat_timeout):
                    await self._send_frame(encode_message(Heartbeat(id=next(self._ids))))
            except TimeoutError:
                await self._shutdown(f"{self.peer} stopped reading for {self.options.heartbeat_timeout:.0f}s")
                return
            except SessionClosed:
                return
