"""Aggregation arithmetic as plain functions and small accumulators over tensor dicts. No I/O.

:class:`WeightedSum` folds one update at a time into a running sum, so the coordinator holds one accumulator
per tensor however many workers answer. Floating-point tensors accumulate in their own precision (float32 for
float16/bfloat16); integer and bool buffers (e.g. BatchNorm's ``num_batches_tracked``) accumulate in float64 and
come back as the rounded weighted mean in their own dtype (bool: a weighted majority), never as floats.

The robust rules (:func:`coordinate_median`, :func:`trimmed_mean`, :func:`krum_scores`) take every update at
once, so whoever calls them holds all n updates in memory; they are the documented exception to streaming.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlink.protocol.spill import LazyState, slices_of, tensor_meta, tensor_slices

__all__ = [
    "WeightedSum",
    "AccumulatorOverflow",
    "BrokenSum",
    "UpdateScan",
    "scan_update",
    "Scanned",
    "tensor_peaks",
    "update_norm",
    "accumulator_dtype",
    "non_finite",
    "add_scaled",
    "add_into",
    "weighted_mean",
    "coordinate_median",
    "trim_count",
    "min_trimmed_count",
    "trimmed_mean",
    "pairwise_sq_distances",
    "krum_scores",
    "lowest",
]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype.is_floating_point or dtype.is_complex:
        return dtype
    return torch.float64


class AccumulatorOverflow(ValueError):
    """Adding an update would take the running sum past the largest value of its dtype; nothing was added."""


class BrokenSum(RuntimeError):
    """An update failed halfway through the fold (reading it back from disk): the sum holds part of it."""


# Rounding of ``weight`` to the accumulator's precision and of the sum itself stays far inside this margin.
_SAFETY = 1.0 - 1e-3


class WeightedSum:
    """``sum_i w_i * state_i`` and ``sum_i w_i``, folded in the order updates are added, a slice at a time.

    An update is folded slice by slice (:func:`~fedlink.protocol.spill.tensor_slices`): one held in memory is read
    as views, one spilled to disk (:class:`~fedlink.protocol.spill.SpilledState`) is read back a slice at a time,
    so folding it costs one slice of memory, and both give the same bits.

    Overflow cannot poison the sum, and a refused update leaves no trace. Before anything is written, each
    tensor's worst case ``max|acc| + weight * max|update|`` is bounded in float64; when every bound is below the
    accumulator dtype's largest value (with a margin for rounding), the update is added in place. Only when a
    bound is exceeded (finite values near 3e38 in float32, which no honest update holds) are the affected tensors
    first tried in float64, a slice at a time and without writing anything: if a new sum would not fit the
    accumulator's dtype, :class:`AccumulatorOverflow` is raised with the accumulator exactly as it was, so the
    caller can refuse that one update and go on; otherwise they are committed from the same float64 sums.

    The one failure that can strike halfway is an I/O error reading a spilled update back (a disk gone bad): the
    sum can then no longer be trusted, so every later call raises :class:`BrokenSum` and the round fails rather
    than release a model that holds part of an update.
    """

    def __init__(self) -> None:
        self.total_weight = 0.0
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._peaks: dict[str, float] = {}  # max |acc| per floating tensor, a float64 upper bound
        self._broken: str | None = None

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if self._broken is not None:
            raise BrokenSum(self._broken)
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if self.count and state.keys() != self._sums.keys():
            raise ValueError("every update must have the same tensors")
        dtypes = {name: _dtype_of(state, name) for name in state}
        peaks = tensor_peaks(state)
        risky = [  # in the update's order, so the refusal names the same tensor every time
            name for name, dtype in dtypes.items()
            if _floating(accumulator_dtype(dtype))
            and not self._peaks.get(name, 0.0) + weight * peaks[name] < _SAFETY * _largest(accumulator_dtype(dtype))
        ]
        for name in risky:  # raises before anything is written
            self._exact_peak(state, name, weight)
        exact = set(risky)
        try:
            for name, dtype in dtypes.items():
                if name not in self._sums:
                    self._dtypes[name] = dtype
                    self._sums[name] = torch.empty(_shape_of(state, name), dtype=accumulator_dtype(dtype))
                    self._peaks[name] = 0.0
                    first = True
                else:
                    first = False
                if name in exact:
                    self._peaks[name] = self._commit_exact(state, name, weight, first)
                else:
                    self._fold(state, name, weight, first)
                    self._peaks[name] = self._peaks[name] + weight * peaks[name]
        except Exception as exc:
            self._broken = f"an update failed halfway through the fold ({exc}); the round's sum is lost"
            raise BrokenSum(self._broken) from exc
        self.total_weight += weight
        self.count += 1

    def _fold(self, state: Mapping[str, torch.Tensor], name: str, weight: float, first: bool) -> None:
        for start, part in tensor_slices(state, name):
            target = self._target(name, start, part)
            if first:
                torch.mul(part.to(target.dtype), weight, out=target)
            else:
                target.add_(part.to(target.dtype), alpha=weight)

    def _target(self, name: str, start: int, part: torch.Tensor) -> torch.Tensor:
        """The accumulator's slice that ``part`` (starting at element ``start``) folds into."""
        return self._sums[name].view(-1)[start : start + part.numel()].view(part.shape)

    def _exact(
        self, state: Mapping[str, torch.Tensor], name: str, weight: float, first: bool
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first element, the slice's new sum in float64)`` for each slice of tensor ``name``."""
        for start, part in tensor_slices(state, name):
            exact = part.to(torch.float64) * weight
            if not first:
                exact += self._target(name, start, part).to(torch.float64)
            yield start, exact

    def _exact_peak(self, state: Mapping[str, torch.Tensor], name: str, weight: float) -> None:
        dtype = accumulator_dtype(_dtype_of(state, name))
        peak = 0.0
        for _, exact in self._exact(state, name, weight, name not in self._sums):
            peak = max(peak, _abs_max(exact))
        if not peak < _largest(dtype):
            raise AccumulatorOverflow(
                f"tensor {name!r}: the weighted sum would reach {peak:.3g}, beyond the largest {dtype} "
                f"({_largest(dtype):.3g})"
            )

    def _commit_exact(self, state: Mapping[str, torch.Tensor], name: str, weight: float, first: bool) -> float:
        peak = 0.0
        for start, exact in self._exact(state, name, weight, first):
            target = self._target(name, start, exact)
            target.copy_(exact)
            peak = max(peak, _abs_max(target))
        return peak

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean in each tensor's original dtype; consumes the accumulator (no extra copy)."""
        if self._broken is not None:
            raise BrokenSum(self._broken)
        if self.count == 0:
            raise ValueError("no updates to average")
        out: dict[str, torch.Tensor] = {}
        for name in list(self._sums):
            acc = self._sums.pop(name)
            acc.div_(self.total_weight)
            dtype = self._dtypes[name]
            if dtype == torch.bool:
                out[name] = acc >= 0.5
            elif not (dtype.is_floating_point or dtype.is_complex):
                out[name] = acc.round_().to(dtype)
            else:
                out[name] = acc.to(dtype)
        return out


def add_scaled(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``base + scale * update`` for floating-point tensors; other tensors are taken from ``update`` as values."""
    out: dict[str, torch.Tensor] = {}
    for name, value in base.items():
        if name not in update:
            out[name] = value
        elif value.is_floating_point():
            out[name] = value + update[name].to(value.dtype) * scale
        else:
            out[name] = update[name].to(value.dtype)
    return out


def add_into(update: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + update``, written into ``update``'s own tensors where the dtypes agree: for a caller that owns the
    update and gives it up (a round's fresh mean delta), so applying it takes no third model's worth of memory.
    The same bits as :func:`add_scaled` (floating-point addition is commutative); other tensors as there."""
    out: dict[str, torch.Tensor] = {}
    for name, value in base.items():
        mine = update.get(name)
        if mine is not None and value.is_floating_point() and mine.dtype == value.dtype and mine.shape == value.shape:
            out[name] = mine.add_(value)
        else:
            out[name] = add_scaled({name: value}, {name: mine} if mine is not None else {})[name]
    return out


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [name for name in state if _floating(_dtype_of(state, name)) and not _all_finite(state, name)]


def _dtype_of(state: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    return tensor_meta(state, name)[0]


def _shape_of(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return tensor_meta(state, name)[1]


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _largest(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if _floating(dtype) else math.inf


def _abs_max(tensor: torch.Tensor, chunk: int = 1 << 18) -> float:
    """``max |x|`` as a Python float (inf for NaN), in slices so no model-sized temporary is made; 0 when empty."""
    if tensor.numel() == 0:
        return 0.0
    if tensor.dtype == torch.bool:
        return 1.0
    floating = tensor.is_floating_point()
    peak = 0.0
    for _, part in _pieces(tensor, chunk):
        # One kernel and no temporary for floating point (the infinity norm); integers have no NaN to care about.
        value = float(torch.linalg.vector_norm(part, math.inf)) if floating else float(part.abs().max())
        if math.isnan(value):
            return math.inf
        peak = max(peak, value)
    return peak


def _pieces(tensor: torch.Tensor, chunk: int) -> Iterable[tuple[int, torch.Tensor]]:
    return slices_of(tensor, chunk)


def _square_sum(part: torch.Tensor, chunk: int = 1 << 18) -> float:
    total = 0.0
    for _, piece in _pieces(part, chunk):
        values = piece.abs() if piece.is_complex() else piece
        total += float(values.to(torch.float64).square().sum())
    return total


@dataclass(frozen=True)
class UpdateScan:
    """What one pass over an update learns: its L2 norm (float64, floating tensors only; inf for NaN or infinity),
    the names of tensors holding NaN or infinity, and the largest ``|x|`` of each tensor (for the fold's overflow
    bound)."""

    norm: float
    non_finite: tuple[str, ...]
    peaks: dict[str, float]


def scan_update(state: Mapping[str, torch.Tensor]) -> UpdateScan:
    """One read of ``state``, a slice at a time (a spilled update is read back once, not three times); a
    :class:`~fedlink.protocol.spill.LazyState` or :class:`Scanned` keeps the peaks for the fold."""
    total = 0.0
    bad: list[str] = []
    peaks: dict[str, float] = {}
    for name in state:
        floating = _floating(_dtype_of(state, name))
        peak = 0.0
        finite = True
        for _, part in tensor_slices(state, name):
            peak = max(peak, _abs_max(part))
            if floating:
                squares = _square_sum(part)
                finite = finite and math.isfinite(squares) and math.isfinite(peak)
                total += squares
        peaks[name] = peak
        if not finite:
            bad.append(name)
    if isinstance(state, (LazyState, Scanned)):
        state.peaks = peaks
    norm = math.sqrt(total) if math.isfinite(total) and not bad else math.inf
    return UpdateScan(norm=norm, non_finite=tuple(bad), peaks=peaks)


class Scanned(dict[str, torch.Tensor]):
    """An update held in memory, with the peaks :func:`scan_update` found in it, so the fold need not look again."""

    peaks: dict[str, float] | None = None


def tensor_peaks(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The largest ``|x|`` of each tensor: kept from :func:`scan_update` where it was scanned, computed otherwise."""
    if isinstance(state, (LazyState, Scanned)) and state.peaks is not None:
        return state.peaks
    return {name: max((_abs_max(part) for _, part in tensor_slices(state, name)), default=0.0) for name in state}


def update_norm(state: Mapping[str, torch.Tensor], chunk: int = 1 << 18) -> float:
    """The L2 norm of a state's floating-point tensors, computed in float64 slice by slice (inf for NaN/inf).

    Integer and bool buffers (step counters, masks) are left out: they are values, not a direction of change.
    """
    total = 0.0
    for name in state:
        if not _floating(_dtype_of(state, name)):
            continue
        for _, part in tensor_slices(state, name):
            total += _square_sum(part, chunk)
    return math.sqrt(total) if math.isfinite(total) else math.inf


def _all_finite(state: Mapping[str, torch.Tensor], name: str, chunk: int = 1 << 18) -> bool:
    # In slices: isfinite over a whole large tensor would allocate temporaries the size of the model.
    return all(
        bool(torch.isfinite(piece).all())
        for _, part in tensor_slices(state, name)
        for _, piece in _pieces(part, chunk)
    )


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of whole states, folded in the given order (dtype rules as :class:`WeightedSum`)."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = WeightedSum()
    for state, weight in zip(states, weights):
        total.add(state, weight)
    return total.mean()


def _stack(values: Sequence[torch.Tensor]) -> torch.Tensor:
    if not values:
        raise ValueError("no values to combine")
    shapes = {tuple(v.shape) for v in values}
    dtypes = {v.dtype for v in values}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise ValueError(f"values differ in shape or dtype: {sorted(shapes)}, {sorted(map(str, dtypes))}")
    return torch.stack(list(values))


def _median_of_stack(stacked: torch.Tensor) -> torch.Tensor:
    n = stacked.shape[0]
    if stacked.dtype == torch.bool:
        return stacked.sum(dim=0) * 2 >= n
    ordered = stacked.sort(dim=0).values
    if not stacked.dtype.is_floating_point:
        # Lower median: a value some worker sent, in its own dtype. clone() drops the view on the whole stack.
        return ordered[(n - 1) // 2].clone()
    if n % 2:
        return ordered[n // 2].clone()
    acc = accumulator_dtype(stacked.dtype)
    return ((ordered[n // 2 - 1].to(acc) + ordered[n // 2].to(acc)) / 2).to(stacked.dtype)


def coordinate_median(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median of same-shaped tensors, unweighted (Yin et al., ICML 2018).

    Floating point: the middle value, or the mean of the two middle values for an even count. Integers: the lower
    of the two middle values, so the result is a value some worker sent. Bool: the majority, ties giving ``True``
    (as :class:`WeightedSum` does).
    """
    return _median_of_stack(_stack(values))


def min_trimmed_count(beta: float) -> int:
    """The fewest values from which :func:`trimmed_mean` with ``beta > 0`` trims at least one at each end."""
    if not 0 < beta < 0.5:
        raise ValueError(f"beta must be in (0, 0.5) here, got {beta}")
    n = max(1, math.ceil(1 / beta))
    while math.floor(beta * n) < 1:  # 1 / beta rounded down in floating point
        n += 1
    while n > 1 and math.floor(beta * (n - 1)) >= 1:
        n -= 1
    return n


def trim_count(n: int, beta: float) -> int:
    """How many of ``n`` values :func:`trimmed_mean` drops at each end: ``floor(beta * n)``.

    Raises ValueError when ``beta > 0`` but ``n`` is too small to trim anything: the result would be the plain
    mean, without the robustness that was asked for.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    if n < 1:
        raise ValueError("no values to combine")
    k = math.floor(beta * n)
    if beta > 0 and k == 0:
        raise ValueError(
            f"trimmed mean with beta={beta} trims floor({beta} * {n}) = 0 of {n} values at each end; "
            f"it needs at least {min_trimmed_count(beta)} values"
        )
    return k


def trimmed_mean(values: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """The coordinate-wise ``beta``-trimmed mean, unweighted (Yin et al., ICML 2018).

    Per coordinate, the ``floor(beta * n)`` smallest and largest values are dropped and the rest averaged in
    accumulator precision. Integer and bool tensors (counters, masks) take :func:`coordinate_median` instead.
    """
    stacked = _stack(values)
    n = stacked.shape[0]
    k = trim_count(n, beta)
    if not stacked.dtype.is_floating_point:
        return _median_of_stack(stacked)
    acc = accumulator_dtype(stacked.dtype)
    kept = stacked.sort(dim=0).values[k : n - k].to(acc)
    return (kept.sum(dim=0) / (n - 2 * k)).to(stacked.dtype)


def pairwise_sq_distances(states: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``(n, n)`` float64 squared Euclidean distances between whole states, over their floating-point tensors.

    Integer and bool buffers are left out: a step counter is no evidence of a model being far from the others.
    """
    n = len(states)
    if n == 0:
        raise ValueError("no states to compare")
    names = list(states[0])
    for state in states[1:]:
        if list(state) != names:
            raise ValueError("every state must have the same tensors")
    out = torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        if not states[0][name].is_floating_point():
            continue
        flat = torch.stack([state[name].reshape(-1).to(torch.float64) for state in states])
        for i in range(n - 1):
            row = (flat[i + 1 :] - flat[i]).square().sum(dim=1)
            out[i, i + 1 :] += row
            out[i + 1 :, i] += row
    return out


def krum_scores(states: Sequence[Mapping[str, torch.Tensor]], num_byzantine: int) -> torch.Tensor:
    """Krum's score of each state (Blanchard et al., NeurIPS 2017), float64, lower is more central.

    The score of update ``i`` is the sum of its squared distances to its ``n - f - 2`` nearest other updates,
    ``f`` being ``num_byzantine``; the guarantee needs ``n > 2f + 2``, which is checked.
    """
    n, f = len(states), num_byzantine
    if f < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise ValueError(f"Krum with num_byzantine f={f} needs n > 2f + 2 = {2 * f + 2} updates, got n={n}")
    distances = pairwise_sq_distances(states)
    nearest = n - f - 2
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(others.sort().values[:nearest].sum())
    return torch.stack(scores)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ties going to the lower index, returned in ascending order."""
    n = scores.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"cannot select {count} of {n} scores")
    order = torch.sort(scores, stable=True).indices[:count]
    return sorted(int(i) for i in order)
