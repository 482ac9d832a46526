"""Frames: the bytes of one WebSocket message, and nothing else. Pure code, no I/O.

Every WebSocket message is binary and starts with a kind byte:

* ``0x01`` control: the rest is a msgpack map, one :mod:`.messages` model (``type`` tag, ``v`` version);
* ``0x02`` data: ``>BQI`` header (kind, ``ref`` = id of the message that announced the state, ``seq`` = chunk
  number from 0), then raw state bytes. Data frames carry no msgpack so that payload bytes are copied once.

:func:`decode_frame` is total: for any input it returns a frame or raises :class:`~.errors.MalformedFrame`,
:class:`~.errors.VersionMismatch` or :class:`~.errors.LimitExceeded`, never anything else.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from pydantic import ValidationError

from ..display import safe
from .errors import LimitExceeded, MalformedFrame, VersionMismatch
from .limits import Limits
from .messages import MESSAGE_ADAPTER, PROTOCOL_VERSION, Message

__all__ = ["KIND_CONTROL", "KIND_DATA", "PREAUTH_FRAME_BYTES", "DataFrame", "encode_message", "encode_data", "decode_frame"]

KIND_CONTROL = 0x01
KIND_DATA = 0x02
_DATA_HEADER = struct.Struct(">BQI")
_CONTROL_LIMIT = 1 << 20  # a control message is small: a state header of many thousand tensors still fits
#: The largest frame accepted before the peer has authenticated: a hello, a challenge, a proof or an error.
PREAUTH_FRAME_BYTES = 8 * 1024

# msgpack's own per-container bounds, checked on each container's header before anything is allocated. After
# authentication a state header may list up to 100,000 tensors; before it, nothing fedlink sends holds more than a
# few dozen items, so a stranger's frame of thousands of tiny containers is refused at the first one.
_UNPACK_LIMITS = {"max_str_len": 65536, "max_array_len": 200_000, "max_map_len": 4096}
_PREAUTH_UNPACK_LIMITS = {"max_str_len": PREAUTH_FRAME_BYTES, "max_array_len": 64, "max_map_len": 32}


@dataclass(frozen=True, slots=True)
class DataFrame:
    ref: int
    seq: int
    payload: memoryview


def encode_message(message: Message) -> bytes:
    body = message.model_dump(mode="json", exclude_none=True)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes((KIND_CONTROL,)) + packed


def encode_data(ref: int, seq: int, payload: bytes | memoryview | Sequence[bytes | memoryview]) -> bytes:
    """A data frame; ``payload`` may be a list of pieces, joined behind the header in one copy."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return b"".join((_DATA_HEADER.pack(KIND_DATA, ref, seq), payload))
    return b"".join((_DATA_HEADER.pack(KIND_DATA, ref, seq), *payload))


def decode_frame(data: Any, limits: Limits, *, preauth: bool = False) -> Message | DataFrame:
    """One frame; ``preauth`` (before the peer authenticated): at most :data:`PREAUTH_FRAME_BYTES`, control
    with tight msgpack container limits, so that a stranger's frame costs next to nothing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedFrame(f"expected a binary frame, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    limit = min(limits.max_frame_bytes, PREAUTH_FRAME_BYTES) if preauth else limits.max_frame_bytes
    if len(view) > limit:
        during = " before authentication" if preauth else ""
        raise LimitExceeded(f"frame of {len(view)} bytes{during}, limit is {limit}")
    if len(view) == 0:
        raise MalformedFrame("empty frame")
    kind = view[0]
    if kind == KIND_DATA:
        if len(view) <= _DATA_HEADER.size:
            raise MalformedFrame("data frame without payload")
        _, ref, seq = _DATA_HEADER.unpack_from(view)
        return DataFrame(ref=ref, seq=seq, payload=view[_DATA_HEADER.size :])
    if kind != KIND_CONTROL:
        raise MalformedFrame(f"unknown frame kind 0x{kind:02x}")
    return _decode_control(view[1:], preauth)


def _decode_control(body: memoryview, preauth: bool) -> Message:
    if len(body) > _CONTROL_LIMIT:
        raise LimitExceeded(f"control message of {len(body)} bytes, limit is {_CONTROL_LIMIT}")
    bounds = _PREAUTH_UNPACK_LIMITS if preauth else _UNPACK_LIMITS
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0, **bounds)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise MalformedFrame(f"control frame is not valid msgpack ({type(exc).__name__}: {safe(exc, limit=200)})") from exc
    if not isinstance(obj, dict):
        raise MalformedFrame(f"control frame holds a {type(obj).__name__}, expected a map")
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        # Without a version number it is not a fedlink message at all; "upgrade the older side" would mislead.
        raise MalformedFrame(f"control message without a protocol version (v={safe(repr(version), limit=64)})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks fedlink protocol version {safe(repr(version), limit=64)}, this side speaks {PROTOCOL_VERSION}; "
            "upgrade the older side"
        )
    try:
        message: Message = MESSAGE_ADAPTER.validate_python(obj)
    except (ValidationError, RecursionError) as exc:
        kind = obj.get("type")
        # Field names, values and the type come from the peer: escaped, so that the error can be logged as is.
        raise MalformedFrame(f"invalid {safe(repr(kind), limit=64)} message: {_summary(exc)}") from exc
    return message


def _summary(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return safe(f"{where}: {first.get('msg')} ({exc.error_count()} problem(s))", limit=300)
    return safe(exc, limit=300)
