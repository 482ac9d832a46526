"""Mask expansion: a ChaCha20 keystream under the full 256-bit seed, read as little-endian uint32 words mod 2^bits.

The masks of secure aggregation (Bonawitz et al., CCS 2017, section 4) must be computationally indistinguishable
from uniform, so the expansion is a stream cipher keyed with all 32 bytes of the seed (never a 32-bit fold of it
fed to a statistical generator). Each seed is used for one purpose in one session (see :mod:`.keys`), so the
nonce and the block counter start at zero. Reducing a uniform 32-bit word mod 2^bits (bits <= 32) keeps it
uniform. OpenSSL's ChaCha20 writes straight into the output array: no intermediate copy.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

from .errors import SecAggConfigError

__all__ = ["SEED_BYTES", "MAX_BITS", "expand", "add_mask", "keystream", "UniformStream"]

SEED_BYTES = 32
MAX_BITS = 32
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte little-endian block counter, then the 12-byte nonce
_CHUNK = 1 << 24  # bytes of keystream per call, so that a masked add never holds a second full-size vector


def keystream(seed: bytes, length: int) -> bytes:
    """``length`` bytes of the ChaCha20 keystream under ``seed`` (RFC 8439 with counter and nonce zero)."""
    _check_seed(seed)
    out = bytearray(length)
    _fill(seed, memoryview(out))
    return bytes(out)


def expand(seed: bytes, length: int, *, bits: int = 32) -> NDArray[np.uint32]:
    """``length`` values uniform in [0, 2^bits) from ``seed``."""
    _check_seed(seed)
    _check_bits(bits)
    words = np.empty(length, dtype="<u4")
    _fill(seed, _bytes_view(words))
    if bits < 32:
        np.bitwise_and(words, np.uint32((1 << bits) - 1), out=words)
    return words


def add_mask(vector: NDArray[np.uint32], seed: bytes, *, bits: int = 32, sign: int = 1) -> None:
    """``vector += sign * expand(seed)`` mod 2^bits, in place, a chunk of keystream at a time."""
    _check_seed(seed)
    _check_bits(bits)
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    words = _CHUNK // 4
    buffer = np.empty(min(words, len(vector)), dtype="<u4")
    zeros = bytes(buffer.nbytes)
    for start in range(0, len(vector), words):
        part = vector[start : start + words]
        view = buffer[: len(part)]
        encryptor.update_into(memoryview(zeros)[: view.nbytes], _bytes_view(view))
        if sign == 1:
            np.add(part, view, out=part)
        else:
            np.subtract(part, view, out=part)
    if bits < 32:
        np.bitwise_and(vector, np.uint32((1 << bits) - 1), out=vector)


class UniformStream:
    """Floats uniform in [0, 1) from a ChaCha20 stream, drawn piece by piece (stochastic rounding's coin flips)."""

    def __init__(self, seed: bytes) -> None:
        _check_seed(seed)
        self._encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()

    def uniform(self, count: int) -> NDArray[np.float64]:
        words = np.frombuffer(self._encryptor.update(bytes(4 * count)), dtype="<u4")
        return words * (1.0 / 4294967296.0)


def _fill(seed: bytes, out: memoryview) -> None:
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    zeros = bytes(min(_CHUNK, len(out)))
    for start in range(0, len(out), _CHUNK):
        part = out[start : start + _CHUNK]
        encryptor.update_into(memoryview(zeros)[: len(part)], part)


def _bytes_view(array: NDArray[np.uint32]) -> memoryview:
    # numpy arrays are buffers; the stubs do not say so
    return memoryview(array.view(np.uint8))  # type: ignore[arg-type]


def _check_seed(seed: bytes) -> None:
    if len(seed) != SEED_BYTES:
        raise SecAggConfigError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise SecAggConfigError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
