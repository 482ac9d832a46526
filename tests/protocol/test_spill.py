"""States received to disk: the same bytes as in memory, no file another process could open, nothing left behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from fedlink.protocol.errors import SessionClosed, TransferError
from fedlink.protocol.session import Inbound, Session
from fedlink.protocol.spill import Spill, SpilledState, memory_backed, slices_of, tensor_meta, tensor_slices
from fedlink.protocol.tensors import State, header_of

from .test_session import WAIT, assert_bit_exact, model_state, result_for, sessions, train

pytestmark = pytest.mark.timeout(30)


def open_files_under(folder: Path) -> list[str]:
    """What this process holds open in ``folder`` (an unnamed O_TMPFILE shows as ``folder/#123 (deleted)``)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


def replying_with(state: State):  # type: ignore[no-untyped-def]
    async def handler(session: Session, inbound: Inbound) -> None:
        await session.reply(inbound, result_for(inbound.message), state=state)

    return handler


def contiguous(state: State) -> State:
    return {name: tensor.contiguous() for name, tensor in state.items()}


async def test_a_spilled_state_reads_back_bit_for_bit_and_leaves_no_name_on_disk(tmp_path: Path) -> None:
    sent = model_state()  # NaN, infinities, -0.0, bfloat16, int, bool, an empty and a non-contiguous tensor
    async with sessions(handler_b=replying_with(sent)) as pair:
        answer = await pair.a.request(train(), timeout=WAIT)
        got = await answer.fetch_spilled(Spill(str(tmp_path)), expected=header_of(sent), timeout=WAIT)
        assert isinstance(got, SpilledState)
        assert os.listdir(tmp_path) == []  # written, but under no name another process could open
        assert len(open_files_under(tmp_path)) == 1
        assert os.fstat(got._file.fileno()).st_mode & 0o777 == 0o600  # the coordinator's user alone
        assert list(got) == list(sent) and len(got) == len(sent)
        assert_bit_exact(dict(got.items()), sent)
        for name, tensor in sent.items():
            assert tensor_meta(got, name) == (tensor.dtype, tuple(tensor.shape))
            flat = tensor.reshape(-1)
            pieces = [(start, p.clone()) for start, p in tensor_slices(got, name, elements=1000)]  # a piece lasts
            assert [start for start, _ in pieces] == list(range(0, flat.numel(), 1000))  # until the next is read
            joined = torch.cat([p for _, p in pieces]) if pieces else flat[:0]
            assert torch.equal(joined.view(torch.uint8), flat.contiguous().view(torch.uint8)), name
        got.close()
        assert open_files_under(tmp_path) == []


async def test_a_transfer_cut_halfway_closes_its_spill_file(tmp_path: Path) -> None:
    big = {"w": torch.arange(50_000, dtype=torch.float32)}  # 49 frames of 4 KiB
    async with sessions(handler_b=replying_with(big)) as pair:
        answer = await pair.a.request(train(), timeout=WAIT)
        fetch = asyncio.ensure_future(answer.fetch_spilled(Spill(str(tmp_path)), timeout=WAIT))
        await pair.tap_a.until(lambda: len(open_files_under(tmp_path)) == 1 and pair.a.counters.frames_in > 10)
        await pair.tap_a.inner.close()  # the connection drops mid-transfer
        with pytest.raises((TransferError, SessionClosed)):
            await fetch
    assert open_files_under(tmp_path) == [] and os.listdir(tmp_path) == []


async def test_an_unwritable_spill_directory_is_named(tmp_path: Path) -> None:
    async with sessions(handler_b=replying_with({"w": torch.ones(3)})) as pair:
        answer = await pair.a.request(train(), timeout=WAIT)
        with pytest.raises(TransferError, match="cannot open a spill file in .*missing"):
            await answer.fetch_spilled(Spill(str(tmp_path / "missing")), timeout=WAIT)


async def test_held_tensors_join_a_spilled_state_in_the_given_order(tmp_path: Path) -> None:
    sent = {"a": torch.arange(6.0).reshape(2, 3), "c": torch.ones(4)}
    async with sessions(handler_b=replying_with(sent)) as pair:
        got = await (await pair.a.request(train(), timeout=WAIT)).fetch_spilled(Spill(str(tmp_path)), timeout=WAIT)
    zeros = torch.zeros((), dtype=torch.float32).expand(5, 2)  # a frozen parameter's known zero delta
    whole = got.with_held(("a", "b", "c"), {"b": zeros})
    assert list(whole) == ["a", "b", "c"] and "b" in whole and "d" not in whole
    assert whole["b"] is zeros and torch.equal(whole["a"], sent["a"])
    assert [p.shape for _, p in tensor_slices(whole, "b", elements=4)] == [(2, 2), (2, 2), (1, 2)]
    with pytest.raises(KeyError, match="'x'"):
        got.with_held(("a", "x"), {})


def test_in_memory_slices_are_views_and_never_copy_an_expanded_tensor() -> None:
    expanded = torch.zeros((), dtype=torch.float32).expand(1000, 1000)
    pieces = list(slices_of(expanded, elements=300_000))
    assert [start for start, _ in pieces] == [0, 300_000, 600_000, 900_000]
    assert all(p.stride()[1] == 0 for _, p in pieces)  # still the stride-0 view: no 4 MB of zeros was made
    dense = torch.arange(10.0)
    assert all(p.data_ptr() == dense[start:].data_ptr() for start, p in slices_of(dense, elements=4))
    assert [p.numel() for _, p in slices_of(torch.tensor(3.0))] == [1]


MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid 0 0
/dev/vdb /tmp/big\\040disk xfs rw 0 0
tmpfs /run tmpfs rw 0 0
"""


def test_a_spill_directory_in_memory_is_recognised() -> None:
    assert memory_backed("/tmp", MOUNTS) and memory_backed("/tmp/work/spill", MOUNTS)
    assert not memory_backed("/tmp/big disk/spill", MOUNTS)  # a disk mounted inside the tmpfs
    assert not memory_backed("/var/tmp", MOUNTS) and not memory_backed("/tmpfoo", MOUNTS)
    assert memory_backed("/run", MOUNTS)
    if os.path.exists("/proc/self/mounts"):  # this machine's own table, as the coordinator reads it
        shm = [line.split()[1] for line in open("/proc/self/mounts") if line.split()[2:3] == ["tmpfs"]]
        if shm:
            assert memory_backed(shm[0])
