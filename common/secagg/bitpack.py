"""Values of ``bits`` bits packed back to back, little-endian: the wire form of a masked vector.

A masked value is uniform mod 2^bits, so nothing compresses it; what is saved is the padding up to a machine word.
8, 16 and 32 bits are plain little-endian arrays; other widths go through numpy's bit (un)packing a chunk at a
time, so the temporary bit matrix stays small whatever the model size.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .errors import ProtocolViolation, SecAggConfigError

__all__ = ["packed_size", "pack", "unpack"]

_CHUNK = 1 << 18  # values per chunk; a multiple of 8, so every chunk ends on a byte boundary
_WORDS = {8: "<u1", 16: "<u2", 32: "<u4"}


def packed_size(length: int, bits: int) -> int:
    return (length * bits + 7) // 8


def pack(values: NDArray[np.uint32], bits: int) -> bytes:
    """``values`` (each below 2^bits) as ``packed_size(len(values), bits)`` bytes."""
    _check(bits)
    if bits in _WORDS:
        return values.astype(_WORDS[bits], copy=False).tobytes()
    out = bytearray()
    for start in range(0, len(values), _CHUNK):
        part = np.ascontiguousarray(values[start : start + _CHUNK], dtype="<u4")
        matrix = np.unpackbits(part.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
        out += np.packbits(matrix.reshape(-1), bitorder="little").tobytes()
    return bytes(out)


def unpack(data: bytes, bits: int, length: int) -> NDArray[np.uint32]:
    """The inverse of :func:`pack`; refuses data of the wrong size for ``length`` values."""
    _check(bits)
    if len(data) != packed_size(length, bits):
        raise ProtocolViolation(f"{length} values of {bits} bits take {packed_size(length, bits)} bytes, got {len(data)}")
    if bits in _WORDS:
        return np.frombuffer(data, dtype=_WORDS[bits]).astype(np.uint32)
    out = np.empty(length, dtype=np.uint32)
    raw = np.frombuffer(data, dtype=np.uint8)
    step = _CHUNK * bits // 8
    for index, start in enumerate(range(0, length, _CHUNK)):
        count = min(_CHUNK, length - start)
        chunk_bits = np.unpackbits(raw[index * step : index * step + packed_size(count, bits)], bitorder="little")
        matrix = np.zeros((count, 32), dtype=np.uint8)
        matrix[:, :bits] = chunk_bits[: count * bits].reshape(count, bits)
        out[start : start + count] = np.packbits(matrix, axis=1, bitorder="little").view("<u4").reshape(-1)
    return out


def _check(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise SecAggConfigError(f"bits must be between 1 and 32, got {bits}")
