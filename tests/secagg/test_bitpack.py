from __future__ import annotations

import numpy as np
import pytest

from fedlink.secagg import bitpack
from fedlink.secagg.errors import ProtocolViolation, SecAggConfigError


def test_fixed_bytes_both_ways() -> None:
    values = np.array([1, 2, 3], dtype=np.uint32)
    # 3-bit values least significant bit first: 100 010 110 -> 0b11010001, 0b0
    assert bitpack.pack(values, 3) == b"\xd1\x00"
    assert bitpack.unpack(b"\xd1\x00", 3, 3).tolist() == [1, 2, 3]
    assert bitpack.pack(np.array([0x0102], dtype=np.uint32), 16) == b"\x02\x01"
    assert bitpack.pack(np.array([0xABCDE], dtype=np.uint32), 20) == b"\xde\xbc\x0a"


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16, 20, 31, 32])
@pytest.mark.parametrize("length", [0, 1, 9, (1 << 18) + 3])
def test_round_trip(bits: int, length: int) -> None:
    values = np.random.default_rng(bits).integers(0, 1 << bits, length, dtype=np.uint64).astype(np.uint32)
    data = bitpack.pack(values, bits)
    assert len(data) == bitpack.packed_size(length, bits) == (length * bits + 7) // 8
    assert np.array_equal(bitpack.unpack(data, bits, length), values)


def test_wrong_sizes_are_refused() -> None:
    with pytest.raises(ProtocolViolation, match="10 values of 12 bits take 15 bytes, got 14"):
        bitpack.unpack(bytes(14), 12, 10)
    with pytest.raises(SecAggConfigError, match="bits must be between 1 and 32"):
        bitpack.pack(np.zeros(3, dtype=np.uint32), 0)
