from __future__ import annotations

import struct

import numpy as np
import pytest
from scipy.stats import chisquare

from fedlink.secagg import prg
from fedlink.secagg.errors import SecAggConfigError

# RFC 8439, appendix A.1, test vector 1: all-zero key, nonce and counter
RFC8439_A1_1 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)
SEED = bytes(range(32))
WORDS_32 = [0x7D2BFD39, 0x6A19C5D9, 0x7703BD8D, 0x494ADCB8, 0x6FD8358A, 0xCC6ADEBC]
WORDS_12 = [3385, 1497, 3469, 3256, 1418, 3772]


def _reference_block(key: bytes, counter: int) -> bytes:
    """ChaCha20's block function straight from RFC 8439 section 2.3, nonce zero: an independent check."""

    def rotl(v: int, c: int) -> int:
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter, 0, 0, 0]
    x = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):  # fmt: skip
            x[a] = (x[a] + x[b]) & 0xFFFFFFFF
            x[d] = rotl(x[d] ^ x[a], 16)
            x[c] = (x[c] + x[d]) & 0xFFFFFFFF
            x[b] = rotl(x[b] ^ x[c], 12)
            x[a] = (x[a] + x[b]) & 0xFFFFFFFF
            x[d] = rotl(x[d] ^ x[a], 8)
            x[c] = (x[c] + x[d]) & 0xFFFFFFFF
            x[b] = rotl(x[b] ^ x[c], 7)
    return struct.pack("<16I", *((xi + si) & 0xFFFFFFFF for xi, si in zip(x, state)))


def test_keystream_matches_rfc8439() -> None:
    assert prg.keystream(bytes(32), 64) == RFC8439_A1_1
    assert _reference_block(bytes(32), 0) == RFC8439_A1_1


def test_fixed_vectors() -> None:
    assert prg.expand(SEED, 6).tolist() == WORDS_32
    assert prg.expand(SEED, 6, bits=12).tolist() == WORDS_12
    reference = _reference_block(SEED, 0) + _reference_block(SEED, 1)
    assert prg.keystream(SEED, 128) == reference
    assert list(struct.unpack("<6I", reference[:24])) == WORDS_32


def test_long_expansion_continues_the_stream_across_chunks() -> None:
    length = prg._CHUNK // 4 + 5  # past one internal chunk
    words = prg.expand(SEED, length)
    tail = prg.keystream(SEED, 4 * length)[-20:]
    assert words[-5:].tolist() == list(struct.unpack("<5I", tail))


@pytest.mark.parametrize("bits", [32, 20, 7])
def test_add_mask_adds_the_expansion_and_sign_minus_one_removes_it(bits: int) -> None:
    base = (np.arange(70_000, dtype=np.uint64) % (1 << bits)).astype(np.uint32)
    masked = base.copy()
    prg.add_mask(masked, SEED, bits=bits)
    expected = (base.astype(np.uint64) + prg.expand(SEED, base.size, bits=bits)) % (1 << bits)
    assert np.array_equal(masked, expected)
    prg.add_mask(masked, SEED, bits=bits, sign=-1)
    assert np.array_equal(masked, base)


def test_masks_are_uniform_and_seed_dependent() -> None:
    values = prg.expand(bytes([7]) * 32, 64_000, bits=4)
    assert chisquare(np.bincount(values, minlength=16)).pvalue > 1e-4
    assert not np.array_equal(prg.expand(bytes(32), 16), prg.expand(bytes(31) + b"\x01", 16))


def test_bad_seed_or_bits_are_refused() -> None:
    with pytest.raises(SecAggConfigError, match="32 bytes, got 16"):
        prg.expand(bytes(16), 4)
    with pytest.raises(SecAggConfigError, match="bits must be between 1 and 32, got 33"):
        prg.expand(SEED, 4, bits=33)
