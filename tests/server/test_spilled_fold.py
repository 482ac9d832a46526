"""The fold over updates read back from disk: the same bits as in memory, and a refused update leaves no trace."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from fedlink.protocol.spill import SLICE_ELEMENTS, Spill, SpillAssembler, SpilledState
from fedlink.protocol.tensors import State, header_of, iter_state_chunks
from fedlink.server.aggregate import (
    AccumulatorOverflow,
    BrokenSum,
    WeightedSum,
    non_finite,
    scan_update,
    update_norm,
)


def spilled(state: State, folder: Path) -> SpilledState:
    header = header_of(state)
    assembler = SpillAssembler(header, Spill(str(folder)))
    for chunk in iter_state_chunks(state, header, 1 << 16):
        assembler.feed(chunk)
    return assembler.result()


def update(seed: int, scale: float = 1.0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        # More than two slices, and not a whole number of them: the fold's slicing is exercised.
        "big": torch.randn(2 * SLICE_ELEMENTS + 12_345, generator=g) * scale,
        "matrix": torch.randn(300, 70, generator=g).t(),  # non-contiguous in memory
        "half": torch.randn(1000, generator=g).to(torch.float16),
        "steps": torch.tensor(seed * 10),
        "mask": torch.rand(9, generator=g) > 0.5,
    }


def bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for name, t in state.items()}


def test_folding_spilled_updates_gives_the_bits_of_folding_them_in_memory(tmp_path: Path) -> None:
    updates = [(update(seed), float(seed + 1)) for seed in range(3)]
    in_memory, on_disk = WeightedSum(), WeightedSum()
    for state, weight in updates:
        in_memory.add(state, weight)
        from_disk = spilled(state, tmp_path)
        scan = scan_update(from_disk)  # as the train stage does: the fold then reuses the peaks
        assert from_disk.peaks == scan.peaks
        on_disk.add(from_disk, weight)
    assert bits(on_disk.mean()) == bits(in_memory.mean())


def test_one_scan_gives_the_norm_the_bad_tensors_and_the_peaks(tmp_path: Path) -> None:
    state = update(1)
    clean = scan_update(spilled(state, tmp_path))
    assert math.isclose(clean.norm, update_norm(state), rel_tol=1e-12)
    assert clean.non_finite == ()
    assert clean.peaks["big"] == float(state["big"].abs().max())
    state["matrix"][3, 5] = float("nan")
    state["half"][-1] = float("-inf")
    dirty = scan_update(spilled(state, tmp_path))
    assert dirty.norm == math.inf
    assert dirty.non_finite == ("matrix", "half") and non_finite(spilled(state, tmp_path)) == ["matrix", "half"]


def test_a_spilled_update_that_would_overflow_is_refused_and_leaves_the_sum_exactly_as_it_was(tmp_path: Path) -> None:
    total = WeightedSum()
    total.add(spilled(update(0), tmp_path), 1.0)
    before = {name: t.clone() for name, t in total._sums.items()}
    hostile = update(1)
    hostile["big"][-1] = 3.0e38  # the last slice of the first tensor: everything before it would fit
    hostile["matrix"][0, 0] = 3.0e38
    with pytest.raises(AccumulatorOverflow, match="'big'"):
        total.add(spilled(hostile, tmp_path), 2.0)
    assert bits(total._sums) == bits(before) and total.count == 1 and total.total_weight == 1.0
    total.add(spilled(update(2), tmp_path), 1.0)  # the round goes on
    reference = WeightedSum()
    reference.add(update(0), 1.0)
    reference.add(update(2), 1.0)
    assert bits(total.mean()) == bits(reference.mean())


def test_near_the_limit_a_spilled_update_still_folds_exactly(tmp_path: Path) -> None:
    """Bounds past float32's largest value but a sum that fits: tried in float64 slice by slice, then committed."""
    n = SLICE_ELEMENTS + 5
    total = WeightedSum()
    total.add(spilled({"w": torch.full((n,), 1.0e38)}, tmp_path), 1.0)
    total.add(spilled({"w": torch.full((n,), -1.0e38)}, tmp_path), 2.5)  # bound 3.5e38, sum -1.5e38
    one = torch.tensor(1.0e38).to(torch.float64)
    expected = (one - 2.5 * torch.tensor(-1.0e38).to(torch.float64).neg()).to(torch.float32)
    assert torch.equal(total._sums["w"], expected.expand(n))


def test_a_disk_failure_halfway_through_the_fold_breaks_the_round_instead_of_releasing_part_of_an_update(
    tmp_path: Path,
) -> None:
    total = WeightedSum()
    total.add(update(0), 1.0)
    state = spilled(update(1), tmp_path)
    scan_update(state)
    os.ftruncate(state._file.fileno(), 4 * SLICE_ELEMENTS)  # the disk loses the file's end: a read comes back short
    with pytest.raises(BrokenSum, match="failed halfway"):
        total.add(state, 1.0)
    with pytest.raises(BrokenSum):
        total.add(update(2), 1.0)  # the sum holds part of an update: nothing more goes in...
    with pytest.raises(BrokenSum):
        total.mean()  # ... and no mean comes out
