"""Per-worker transfer settings that need no round: upload slots against the upload buffer."""

from __future__ import annotations

from fedlink.compression import CompressionSpec
from fedlink.protocol.limits import Limits
from fedlink.protocol.tensors import StateHeader, TensorSpec
from fedlink.server.transfer import upload_slots

MiB = 1 << 20


def _update(megabytes: int) -> StateHeader:
    return StateHeader(tensors=(TensorSpec(name="w", dtype="float32", shape=(megabytes * MiB // 4,)),))


def test_small_models_keep_every_upload_slot_and_large_ones_get_what_the_buffer_holds() -> None:
    limits = Limits()  # 4 slots, 512 MiB
    assert upload_slots(limits, _update(1)) == 4
    assert upload_slots(limits, _update(200)) == 2
    assert upload_slots(limits, _update(400)) == 1
    assert upload_slots(limits, _update(4096)) == 1  # always room for one
    assert upload_slots(Limits(upload_buffer_bytes=8 * 1024 * MiB), _update(400)) == 4
    assert upload_slots(Limits(concurrent_uploads=1), _update(1)) == 1


def test_spilled_updates_take_no_room_and_compressed_ones_count_as_sent() -> None:
    limits = Limits()  # 4 slots, 512 MiB, spill from 16 MiB
    assert upload_slots(limits, _update(400), spills=True) == 4  # on disk while they wait
    assert upload_slots(limits, _update(8), spills=True) == 4  # in memory, but 4 x 8 MiB fit
    int8 = CompressionSpec(name="int8")
    assert upload_slots(limits, _update(400), spills=True, compression=int8) == 4  # 100 MiB as sent: on disk
    # Nothing spills: 64 MiB plain (a worker without the scheme) or 16 MiB as int8, in memory: four fit.
    assert upload_slots(Limits(spill_bytes=1 << 40), _update(64), spills=True, compression=int8) == 4
    # A worker that does not offer the scheme sends a plain update: without spilling (FedBuff) it counts whole.
    assert upload_slots(limits, _update(400), compression=int8) == 1
