"""The authenticated handshake in memory: success, mismatches reported on both sides, wrong tokens, replay,
reflection, splicing and tampering refused, nothing secret on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fedlink.protocol.auth import Keyring, Secret, derive_key
from fedlink.protocol.channel import MemoryChannel, memory_pair
from fedlink.protocol.errors import AuthenticationFailed, HandshakeFailed, ProtocolError
from fedlink.protocol.frames import decode_frame, encode_message
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import AuthChallenge, AuthProof, ErrorMessage, Hello, Message
from fedlink.protocol.session import handshake

pytestmark = pytest.mark.timeout(30)

COORDINATOR = Hello(role="coordinator", peer_id="c1")
WORKER = Hello(role="worker", peer_id="w1")
LIMITS = Limits()
WAIT = 5.0
TOKEN = b"tbfN_3933M82iiJ_3YwEWobnHMV4SyS00sVW1JCNWsw"  # secrets.token_urlsafe(32), drawn once
OTHER = b"ppQMqwWCqh0R36YfNCqYhkl0b2C-OjwgYnAbO3WhLUM"


def ring(token: bytes = TOKEN) -> Keyring:
    return Keyring(shared=Secret.from_token(token, origin="test token"))


class Recorder:
    """A channel end that keeps every frame it sends and receives, and may rewrite the ones it receives."""

    def __init__(self, inner: MemoryChannel, rewrite: Callable[[int, bytes], bytes] | None = None) -> None:
        self.inner, self.peer = inner, inner.peer
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self._rewrite = rewrite

    async def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        await self.inner.send(data)

    async def recv(self) -> bytes | str:
        data = await self.inner.recv()
        assert isinstance(data, bytes)
        if self._rewrite is not None:
            data = self._rewrite(len(self.received), data)
        self.received.append(data)
        return data

    async def close(self, reason: str = "") -> None:
        await self.inner.close(reason)


async def pair(
    coordinator: Keyring | None,
    worker: Keyring | None,
    *,
    coordinator_dials: bool = True,
    rewrite_at_worker: Callable[[int, bytes], bytes] | None = None,
) -> tuple[Hello | BaseException, Hello | BaseException, Recorder, Recorder]:
    end_c, end_w = memory_pair("coordinator-end", "worker-end")
    rec_c, rec_w = Recorder(end_c), Recorder(end_w, rewrite_at_worker)
    got_c, got_w = await asyncio.gather(
        handshake(rec_c, COORDINATOR, limits=LIMITS, timeout=WAIT, keyring=coordinator, initiator=coordinator_dials),
        handshake(rec_w, WORKER, limits=LIMITS, timeout=WAIT, keyring=worker, initiator=not coordinator_dials),
        return_exceptions=True,
    )
    return got_c, got_w, rec_c, rec_w


def frames(data: list[bytes]) -> list[Message]:
    out = []
    for item in data:
        frame = decode_frame(item, LIMITS)
        assert isinstance(frame, Message)
        out.append(frame)
    return out


@pytest.mark.parametrize("coordinator_dials", [True, False], ids=["coordinator-dials", "worker-dials"])
async def test_same_token_authenticates_both_ways(coordinator_dials: bool) -> None:
    got_c, got_w, rec_c, rec_w = await pair(ring(), ring(), coordinator_dials=coordinator_dials)
    assert isinstance(got_c, Hello) and got_c.peer_id == "w1" and got_c.auth == "hmac-sha256"
    assert isinstance(got_w, Hello) and got_w.peer_id == "c1" and got_w.auth == "hmac-sha256"
    sent = [type(m) for m in frames(rec_c.sent)]
    assert sent == [Hello, AuthChallenge, AuthProof]
    assert [type(m) for m in frames(rec_w.sent)] == [Hello, AuthChallenge, AuthProof]


async def test_without_tokens_nothing_changes() -> None:
    got_c, got_w, rec_c, rec_w = await pair(None, None)
    assert got_c == WORKER and got_w == COORDINATOR
    assert rec_c.sent == [encode_message(COORDINATOR)], "no auth message, and the hello has its old bytes"


async def test_the_dialler_proves_first_and_the_listener_only_after_checking() -> None:
    """A listener must never compute a proof for a peer that has not proved itself (no signing oracle)."""
    got_c, got_w, rec_c, rec_w = await pair(ring(), ring(OTHER), coordinator_dials=True)
    assert isinstance(got_c, AuthenticationFailed) and isinstance(got_w, AuthenticationFailed)
    assert AuthProof in [type(m) for m in frames(rec_c.sent)]
    assert AuthProof not in [type(m) for m in frames(rec_w.sent)], "the listening worker never sent its proof"


@pytest.mark.parametrize("coordinator_dials", [True, False], ids=["coordinator-dials", "worker-dials"])
async def test_wrong_token_is_refused_on_both_sides(coordinator_dials: bool) -> None:
    got_c, got_w, _, _ = await pair(ring(), ring(OTHER), coordinator_dials=coordinator_dials)
    listener, dialler = (got_w, got_c) if coordinator_dials else (got_c, got_w)
    assert isinstance(listener, AuthenticationFailed) and isinstance(dialler, AuthenticationFailed)
    assert "did not prove that it holds the token from test token" in str(listener)
    assert "refused us: authentication failed" in str(dialler)


async def test_worker_requires_a_token_the_coordinator_lacks() -> None:
    got_c, got_w, _, _ = await pair(None, ring())
    assert isinstance(got_c, AuthenticationFailed) and isinstance(got_w, AuthenticationFailed)
    assert "worker 'w1'" in str(got_c) and "requires a token, this coordinator has none" in str(got_c)
    assert "auth.token_file" in str(got_c), "the coordinator's operator is told which key to set"
    assert "coordinator 'c1'" in str(got_w) and "has no token, but this worker requires one" in str(got_w)


async def test_coordinator_requires_a_token_the_worker_lacks() -> None:
    got_c, got_w, _, _ = await pair(ring(), None)
    assert isinstance(got_c, AuthenticationFailed) and isinstance(got_w, AuthenticationFailed)
    assert "has no token, but this coordinator requires one" in str(got_c) and "--token-file" in str(got_c)
    assert "requires a token, this worker has none" in str(got_w) and "--token-file" in str(got_w)


async def test_per_worker_tokens_on_a_listening_coordinator() -> None:
    own = Secret.from_token(OTHER, origin="w1's token")
    listener = Keyring(shared=Secret.from_token(TOKEN, origin="shared"), per_peer={"w1": own}, missing="add it")
    got_c, got_w, _, _ = await pair(listener, ring(OTHER), coordinator_dials=False)
    assert isinstance(got_c, Hello) and isinstance(got_w, Hello), "w1 with its own token is admitted"
    got_c, got_w, _, _ = await pair(listener, ring(TOKEN), coordinator_dials=False)
    assert isinstance(got_c, AuthenticationFailed), "the shared token does not admit a worker that has its own"
    only_listed = Keyring(per_peer={"w9": own}, missing="list its id under auth.workers")
    got_c, got_w, _, _ = await pair(only_listed, ring(OTHER), coordinator_dials=False)
    assert isinstance(got_c, AuthenticationFailed) and "no token for worker 'w1'" in str(got_c)
    assert "auth.workers" in str(got_c)
    assert isinstance(got_w, AuthenticationFailed) and "w9" not in str(got_w), "the peer learns nothing of other ids"


async def _replay(script: list[bytes], keyring: Keyring) -> tuple[BaseException | Hello, list[Message]]:
    """Play recorded frames to a fresh listening worker, as an attacker would, and see what it does."""
    attacker, victim = memory_pair("attacker", "victim")
    for data in script:
        await attacker.send(data)
    result = await asyncio.gather(
        handshake(victim, WORKER, limits=LIMITS, timeout=1.0, keyring=keyring, initiator=False),
        return_exceptions=True,
    )
    answers = []
    while not attacker._inbox.empty():
        answers.append(decode_frame(attacker._inbox.get_nowait(), LIMITS))
    return result[0], [a for a in answers if isinstance(a, Message)]


async def test_a_recorded_handshake_replayed_is_refused() -> None:
    got_c, got_w, rec_c, _ = await pair(ring(), ring())
    assert isinstance(got_c, Hello) and isinstance(got_w, Hello)
    result, answers = await _replay(rec_c.sent, ring())
    assert isinstance(result, AuthenticationFailed) and "did not prove" in str(result)
    assert not any(isinstance(a, AuthProof) for a in answers), "the victim proves nothing to a replayer"
    assert isinstance(answers[-1], ErrorMessage) and answers[-1].code == "auth_failed"


async def test_a_reflected_challenge_is_refused() -> None:
    """An attacker without the token sends the worker's own challenge back to it."""
    attacker, victim = memory_pair("attacker", "victim")
    hello = encode_message(COORDINATOR.model_copy(update={"auth": "hmac-sha256"}))
    await attacker.send(hello)
    task = asyncio.ensure_future(handshake(victim, WORKER, limits=LIMITS, timeout=2, keyring=ring(), initiator=False))
    await attacker.recv()  # the worker's hello
    challenge = await attacker.recv()
    await attacker.send(challenge)
    with pytest.raises(AuthenticationFailed, match="sent back our own challenge"):
        await task


async def test_hello_and_proof_spliced_from_two_connections_are_refused() -> None:
    """Proofs from one connection do not fit the nonces of another, even with the same hellos."""
    first = await pair(ring(), ring())
    second = await pair(ring(), ring())
    spliced = [first[2].sent[0], second[2].sent[1], first[2].sent[2]]
    result, _ = await _replay(spliced, ring())
    assert isinstance(result, AuthenticationFailed)


async def test_a_hello_altered_on_the_way_fails_both_sides() -> None:
    """The coordinator's hello, rewritten by someone on the path, still decodes, but the proofs no longer match."""

    def rename(index: int, data: bytes) -> bytes:
        return data.replace(b"c1", b"c2") if index == 0 else data

    got_c, got_w, _, rec_w = await pair(ring(), ring(), rewrite_at_worker=rename)
    assert isinstance(decode_frame(rec_w.received[0], LIMITS), Hello), "the altered hello is a valid hello"
    assert isinstance(got_c, AuthenticationFailed) and isinstance(got_w, AuthenticationFailed)


async def test_a_peer_that_stops_during_authentication_times_out() -> None:
    attacker, victim = memory_pair("attacker", "victim")
    await attacker.send(encode_message(COORDINATOR.model_copy(update={"auth": "hmac-sha256"})))
    with pytest.raises(HandshakeFailed, match="no authentication from attacker within 0.2s"):
        await handshake(victim, WORKER, limits=LIMITS, timeout=0.2, keyring=ring(), initiator=False)


@pytest.mark.parametrize(
    "second",
    [
        encode_message(AuthProof(mac="0" * 64)),
        encode_message(COORDINATOR),
        b"\x01\xc1",
        b"\x02" + bytes(13) + b"x",
    ],
    ids=["proof-before-challenge", "second-hello", "garbage", "data-frame"],
)
async def test_anything_but_a_challenge_after_the_hello_is_refused(second: bytes) -> None:
    attacker, victim = memory_pair("attacker", "victim")
    await attacker.send(encode_message(COORDINATOR.model_copy(update={"auth": "hmac-sha256"})))
    await attacker.send(second)
    with pytest.raises(HandshakeFailed) as refused:
        await handshake(victim, WORKER, limits=LIMITS, timeout=WAIT, keyring=ring(), initiator=False)
    assert isinstance(refused.value, ProtocolError)


async def test_neither_token_nor_key_ever_travels() -> None:
    got_c, got_w, rec_c, rec_w = await pair(ring(), ring())
    assert isinstance(got_c, Hello) and isinstance(got_w, Hello)
    wire = b"".join(rec_c.sent + rec_w.sent)
    key = derive_key(TOKEN)
    for secret in (TOKEN, key, key.hex().encode(), TOKEN.hex().encode()):
        assert secret not in wire
