"""Fuzz campaign of the frame decoder and the handshake: the only exceptions that escape are fedlink's own.

    python bench/fuzz.py                      # the full campaign: 105,000 inputs (a few minutes on 2 cores)
    python bench/fuzz.py --examples 5000      # a quick look
    python bench/fuzz.py --target tampered    # one target

Four targets, run with hypothesis (generated, then mutated, inputs; failures are shrunk to a minimal example):

* ``decode``: :func:`~fedlink.protocol.frames.decode_frame` on the messages the handshake exchanges (hellos with
  and without ``auth``, challenges, proofs, errors): structured maps with wrong and random fields, byte-level
  mutations of valid frames, raw bytes. Must return a message (that encodes again) or raise
  ``MalformedFrame`` / ``VersionMismatch`` / ``LimitExceeded``. (The generic decoder fuzzing of every message
  type lives in ``tests/protocol/test_frames.py``.)
* ``preauth``: ``decode_frame(..., preauth=True)``, what every frame of a handshake goes through, on frames built
  around the pre-authentication limits: container bombs (arrays and maps just under and over the bounds, deep
  nesting, long strings) inside hellos, frames just under and over ``PREAUTH_FRAME_BYTES``, and everything the
  ``decode`` target sends. Only ``MalformedFrame`` / ``VersionMismatch`` / ``LimitExceeded`` may escape; a frame
  over the size limit is always ``LimitExceeded``; and the pre-authentication decoder is never looser than the
  normal one (whatever it accepts decodes identically after authentication).
* ``scripted``: :func:`~fedlink.protocol.session.handshake` against a peer that sends a generated script of frames
  (well-formed, mutated or garbage), with and without a token on our side, as dialler and as listener. Must
  return the peer's hello or raise a ``ProtocolError`` (``HandshakeFailed``, ``AuthenticationFailed``,
  ``VersionMismatch``, ``RemoteError``); a handshake that requires a token never succeeds against the script,
  which cannot know our fresh nonce.
* ``tampered``: two honest peers (same token, different tokens, or none) with an attacker on the path who edits
  one frame in flight. Only ``ProtocolError`` may escape, neither side may hang, and when both sides require a
  token: any change to a hello's bytes, or different tokens, means neither side succeeds; untouched frames and the
  same token mean both do.

Prints, per target, the inputs tried and every outcome seen (the peer's hello or the exception's class); exits 1
if anything else escaped, printing hypothesis's minimal failing example. ``tests/protocol/test_fuzz_handshake.py``
runs the same targets: about 650 inputs in CI, this full campaign under ``-m slow``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlink.faults import corrupt
from fedlink.display import PEER_ID_PATTERN
from fedlink.protocol.auth import Keyring, Secret, new_token
from fedlink.protocol.channel import memory_pair
from fedlink.protocol.errors import LimitExceeded, MalformedFrame, ProtocolError, VersionMismatch
from fedlink.protocol.frames import PREAUTH_FRAME_BYTES, decode_frame, encode_message
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import AuthChallenge, AuthProof, ErrorMessage, Heartbeat, Hello, Message
from fedlink.protocol.session import handshake

__all__ = ["TARGETS", "WEIGHTS", "Tally", "TALLY", "build", "main"]

LIMITS = Limits(max_frame_bytes=64 * 1024)
TOKEN = new_token().encode()  # fresh strong tokens: weak ones are refused (see fedlink.protocol.auth)
OTHER_TOKEN = new_token().encode()
RINGS = {
    "none": None,
    "token": Keyring(shared=Secret.from_token(TOKEN, origin="fuzz token")),
    "other": Keyring(shared=Secret.from_token(OTHER_TOKEN, origin="other fuzz token")),
}
HELLOS = {"coordinator": Hello(role="coordinator", peer_id="fuzz-c"), "worker": Hello(role="worker", peer_id="fuzz-w")}
DECODE_ERRORS = (MalformedFrame, VersionMismatch, LimitExceeded)


@dataclass
class Tally:
    """What each target was given and what came out of it, over a whole run (shrinking and replays included)."""

    inputs: Counter[str]
    outcomes: dict[str, Counter[str]]

    def note(self, target: str, outcome: str) -> None:
        self.inputs[target] += 1
        self.outcomes.setdefault(target, Counter())[outcome] += 1


TALLY = Tally(Counter(), {})
_LOOP = asyncio.new_event_loop()


# -- strategies ------------------------------------------------------------------------------------------------------

_hex32 = st.binary(min_size=32, max_size=32).map(bytes.hex)
_text = st.text(max_size=12)
_scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | _text | _hex32
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3), max_leaves=6
)


def _valid_messages() -> st.SearchStrategy[Message]:
    hello = st.builds(
        Hello,
        role=st.sampled_from(["worker", "coordinator"]),
        peer_id=st.from_regex(PEER_ID_PATTERN, fullmatch=True),
        auth=st.sampled_from([None, "hmac-sha256"]),
        heartbeat=st.floats(0.5, 3600),
    )
    challenge = st.builds(AuthChallenge, nonce=_hex32, id=st.integers(0, 2**63 - 1))
    proof = st.builds(AuthProof, mac=_hex32, id=st.integers(0, 2**63 - 1))
    error = st.builds(ErrorMessage, code=st.sampled_from(["auth_failed", "busy", "handshake_failed", "x"]), message=_text)
    return st.one_of(hello, challenge, proof, error, st.just(Heartbeat()))


_fields = st.sampled_from(["v", "id", "type", "role", "peer_id", "auth", "nonce", "mac", "code", "message", "heartbeat"])
_types = st.sampled_from(["hello", "auth_challenge", "auth_proof", "error", "heartbeat", "bye"])
_maps = st.fixed_dictionaries({"v": st.just(1) | _values, "type": _types | _values}).flatmap(
    lambda base: st.dictionaries(_fields | _text, _values, max_size=6).map(lambda extra: {**extra, **base})
)
_edits = st.lists(
    st.tuples(st.integers(0, 1 << 12), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
    min_size=1,
    max_size=4,
)


def _packed(body: dict[str, Any]) -> bytes:
    try:
        return b"\x01" + msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\x01\xc1"


def _bomb(depth: int, width: int, kind: str) -> Any:
    """``width`` empty containers in one, nested ``depth`` deep one inside the other: wide or deep, never both (a
    wide tree of references would pack exponentially)."""
    inner: Any = [[]] * width if kind == "array" else {f"k{i}": {} for i in range(width)}
    for _ in range(depth):
        inner = [inner] if kind == "array" else {"k": inner}
    return inner


#: Hellos carrying containers around the pre-authentication bounds, and frames around its size limit.
_bombs = st.one_of(
    st.tuples(st.integers(0, 300), st.integers(0, 130), st.sampled_from(["array", "map"]), _fields | _text).map(
        lambda t: _packed({"v": 1, "type": "hello", "role": "worker", "peer_id": "w", t[3]: _bomb(t[0], t[1], t[2])})
    ),
    st.integers(PREAUTH_FRAME_BYTES - 64, PREAUTH_FRAME_BYTES + 64).map(
        lambda n: _packed({"v": 1, "type": "hello", "role": "worker", "peer_id": "w", "software": "s" * n})[: n + 1]
    ),
    st.integers(0, 20_000).map(lambda n: _packed({"v": 1, "type": "error", "code": "x", "message": "m" * n})),
    st.integers(0, 5000).map(lambda n: b"\x01" + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n),  # array32 of n []
)

#: One frame a hostile peer may send: a valid message, a mutated one, a structured map, or bytes/text.
_frames = st.one_of(
    _valid_messages().map(encode_message),
    _bombs,
    st.tuples(_valid_messages().map(encode_message), _edits).map(lambda pair: corrupt(*pair)),
    _maps.map(_packed),
    st.binary(max_size=200),
    st.text(max_size=20),
)


def _script() -> st.SearchStrategy[list[bytes | str]]:
    """A well-formed start (a hello, then a challenge and a proof) with some frames replaced, or any frames."""
    plausible = st.tuples(
        st.builds(Hello, role=st.sampled_from(["worker", "coordinator"]), peer_id=st.sampled_from(["fuzz-c", "fuzz-w", "x"]),
                  auth=st.sampled_from([None, "hmac-sha256"])).map(encode_message),
        _hex32.map(lambda n: encode_message(AuthChallenge(nonce=n))),
        _hex32.map(lambda m: encode_message(AuthProof(mac=m))),
    ).flatmap(
        lambda frames: st.lists(st.tuples(st.integers(0, 2), _frames), max_size=2).map(
            lambda swaps: _swap(list(frames), swaps)
        )
    )
    return st.one_of(plausible, st.lists(_frames, max_size=5))


def _swap(frames: list[bytes | str], swaps: list[tuple[int, bytes | str]]) -> list[bytes | str]:
    for index, frame in swaps:
        frames[index] = frame
    return frames


# -- targets ---------------------------------------------------------------------------------------------------------


def decode_target(data: bytes | str) -> str:
    try:
        frame = decode_frame(data, LIMITS)
    except DECODE_ERRORS as exc:
        return type(exc).__name__
    assert isinstance(frame, Message) or type(frame).__name__ == "DataFrame", type(frame)
    if isinstance(frame, Message):
        assert isinstance(encode_message(frame), bytes)
        return f"decoded {frame.type}"
    return "decoded data"


class _Script:
    """A peer that sends a fixed list of frames, then hangs up; it accepts everything we send."""

    def __init__(self, frames: list[bytes | str]) -> None:
        self.peer = "fuzz-peer"
        self._frames = list(frames)

    async def send(self, data: bytes) -> None:
        decode_frame(data, Limits())  # whatever we say must itself be a valid frame

    async def recv(self) -> bytes | str:
        if not self._frames:
            from fedlink.protocol.channel import ChannelClosed

            raise ChannelClosed("script over")
        return self._frames.pop(0)

    async def close(self, reason: str = "") -> None:
        self._frames.clear()


def scripted_target(frames: list[bytes | str], role: str, ring: str, initiator: bool) -> str:
    async def run() -> Hello:
        return await handshake(
            _Script(frames), HELLOS[role], limits=LIMITS, timeout=5, keyring=RINGS[ring], initiator=initiator
        )

    try:
        peer = _LOOP.run_until_complete(run())
    except ProtocolError as exc:
        return type(exc).__name__
    assert isinstance(peer, Hello) and peer.role != role
    assert RINGS[ring] is None and peer.auth is None, "a scripted peer cannot know our fresh nonce"
    return "accepted"


class _Tamper:
    """The receiving end of one direction, where the ``index``-th frame received is edited on its way in."""

    def __init__(self, inner: Any, index: int, edits: list[tuple[int, int, str]]) -> None:
        self.inner, self.peer = inner, inner.peer
        self._index, self._edits, self._seen = index, edits, 0
        self.hello_changed = False

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes | str:
        data = await self.inner.recv()
        if self._seen == self._index and self._edits:
            edited = corrupt(bytes(data), self._edits)
            self.hello_changed = self._index == 0 and edited != data
            data = edited
        self._seen += 1
        return data

    async def close(self, reason: str = "") -> None:
        await self.inner.close(reason)


def tampered_target(
    ring_c: str, ring_w: str, coordinator_dials: bool, to_worker: bool, index: int, edits: list[tuple[int, int, str]]
) -> str:
    async def side(channel: Any, role: str, ring: str, initiator: bool) -> Hello | ProtocolError:
        try:
            return await handshake(channel, HELLOS[role], limits=LIMITS, timeout=5, keyring=RINGS[ring], initiator=initiator)
        except ProtocolError as exc:
            return exc
        finally:
            await channel.close()

    async def run() -> tuple[Hello | ProtocolError, Hello | ProtocolError, bool]:
        end_c, end_w = memory_pair("coordinator-end", "worker-end")
        tamper = _Tamper(end_w if to_worker else end_c, index, edits)
        chan_c: Any = end_c if to_worker else tamper
        chan_w: Any = tamper if to_worker else end_w
        async with asyncio.timeout(10):  # neither side may hang
            got_c, got_w = await asyncio.gather(
                side(chan_c, "coordinator", ring_c, coordinator_dials), side(chan_w, "worker", ring_w, not coordinator_dials)
            )
        return got_c, got_w, tamper.hello_changed

    got_c, got_w, hello_changed = _LOOP.run_until_complete(run())
    both_auth = RINGS[ring_c] is not None and RINGS[ring_w] is not None
    success = [isinstance(g, Hello) for g in (got_c, got_w)]
    if both_auth and (hello_changed or ring_c != ring_w):
        assert not any(success), (got_c, got_w)
    if not edits and ring_c == ring_w:
        assert all(success), (got_c, got_w)
    return " / ".join("ok" if isinstance(g, Hello) else type(g).__name__ for g in (got_c, got_w))


def preauth_target(data: bytes | str) -> str:
    try:
        frame = decode_frame(data, LIMITS, preauth=True)
    except DECODE_ERRORS as exc:
        size = len(data) if not isinstance(data, str) else 0
        assert size <= PREAUTH_FRAME_BYTES or isinstance(exc, LimitExceeded), (size, exc)
        return type(exc).__name__
    assert not isinstance(data, str) and len(data) <= PREAUTH_FRAME_BYTES
    assert decode_frame(data, LIMITS) == frame, "pre-authentication decoding is never looser than the normal one"
    return f"decoded {getattr(frame, 'type', 'data')}"


def _preauth(examples: int) -> Callable[[], None]:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.one_of(_bombs, st.tuples(_bombs, _edits).map(lambda p: corrupt(*p)), _frames))
    def run(data: bytes | str) -> None:
        TALLY.note("preauth", preauth_target(data))

    return run


def _decode(examples: int) -> Callable[[], None]:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.one_of(_frames, st.tuples(_frames.filter(lambda f: isinstance(f, bytes)), _edits).map(lambda p: corrupt(*p))))
    def run(data: bytes | str) -> None:
        TALLY.note("decode", decode_target(data))

    return run


def _scripted(examples: int) -> Callable[[], None]:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(frames=_script(), role=st.sampled_from(["worker", "coordinator"]), ring=st.sampled_from(["none", "token"]),
           initiator=st.booleans())
    def run(frames: list[bytes | str], role: str, ring: str, initiator: bool) -> None:
        TALLY.note("scripted", scripted_target(frames, role, ring, initiator))

    return run


def _tampered(examples: int) -> Callable[[], None]:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        rings=st.sampled_from([("token", "token"), ("token", "other"), ("none", "none"), ("token", "none"), ("none", "token")]),
        coordinator_dials=st.booleans(),
        to_worker=st.booleans(),
        index=st.integers(0, 3),
        edits=st.lists(
            st.tuples(st.integers(0, 1 << 10), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])), max_size=3
        ),
    )
    def run(rings: tuple[str, str], coordinator_dials: bool, to_worker: bool, index: int, edits: list[tuple[int, int, str]]) -> None:
        TALLY.note("tampered", tampered_target(rings[0], rings[1], coordinator_dials, to_worker, index, edits))

    return run


TARGETS: dict[str, Callable[[int], Callable[[], None]]] = {
    "decode": _decode, "preauth": _preauth, "scripted": _scripted, "tampered": _tampered,
}
#: Shares of a campaign's inputs: the handshakes get most, being the new and stateful part.
WEIGHTS = {"decode": 0.2, "preauth": 0.2, "scripted": 0.38, "tampered": 0.22}


def build(target: str, examples: int) -> Callable[[], None]:
    """The hypothesis test for ``target`` with ``examples`` generated inputs; call it to run it."""
    return TARGETS[target](examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=105_000, help="generated inputs over all targets")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="run only these (repeatable)")
    args = parser.parse_args(argv)
    chosen = args.target or list(TARGETS)
    total = sum(WEIGHTS[t] for t in chosen)
    failed = False
    started = time.perf_counter()
    for target in chosen:
        examples = max(1, round(args.examples * WEIGHTS[target] / total))
        began = time.perf_counter()
        try:
            build(target, examples)()
        except BaseException as exc:  # noqa: BLE001 - report what escaped, with hypothesis's minimal example above
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed = True
            print(f"{target}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        tried = TALLY.inputs[target]
        print(f"{target}: {tried:,} inputs in {time.perf_counter() - began:.0f}s ({examples:,} generated)")
        for outcome, count in TALLY.outcomes.get(target, Counter()).most_common():
            print(f"    {count:>8,}  {outcome}")
    print(f"total: {sum(TALLY.inputs.values()):,} inputs in {time.perf_counter() - started:.0f}s; "
          f"{'FAILED: an unexpected exception escaped' if failed else 'only fedlink protocol errors escaped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
