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
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "WeightedSum",
    "AccumulatorOverflow",
    "update_norm",
    "accumulator_dtype",
    "non_finite",
    "add_scaled",
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


# Rounding of ``weight`` to the accumulator's precision and of the sum itself stays far inside this margin.
_SAFETY = 1.0 - 1e-3


class WeightedSum:
    """``sum_i w_i * state_i`` and ``sum_i w_i``, folded in the order updates are added.

    Overflow cannot poison the sum. Before an update is added, each tensor's worst case
    ``max|acc| + weight * max|update|`` is bounded in float64; when every bound is below the accumulator dtype's
    largest value (with a margin for rounding), the update is added in place exactly as it always was, so normal
    results stay bit for bit what they were. Only when a bound is exceeded (finite values near 3e38 in float32,
    which no honest update holds) is the update tried in float64 on copies: if every new sum still fits the
    accumulator's dtype it is committed, otherwise :class:`AccumulatorOverflow` is raised and the accumulator is
    left exactly as it was (nothing was written to it), so the caller can refuse that one update and go on.
    """

    def __init__(self) -> None:
        self.total_weight = 0.0
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._peaks: dict[str, float] = {}  # max |acc| per floating tensor, a float64 upper bound

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if self.count and state.keys() != self._sums.keys():
            raise ValueError("every update must have the same tensors")
        peaks = {name: _abs_max(tensor) for name, tensor in state.items()}
        risky = [
            name for name, tensor in state.items()
            if _floating(accumulator_dtype(tensor.dtype))
            and not self._peaks.get(name, 0.0) + weight * peaks[name] < _SAFETY * _largest(accumulator_dtype(tensor.dtype))
        ]
        staged = self._staged(state, weight, risky) if risky else {}
        for name, tensor in state.items():
            acc = self._sums.get(name)
            if name in staged:
                if acc is None:
                    self._dtypes[name] = tensor.dtype
                self._sums[name] = staged[name]
                self._peaks[name] = _abs_max(staged[name])
            elif acc is None:
                self._dtypes[name] = tensor.dtype
                self._sums[name] = tensor.to(accumulator_dtype(tensor.dtype)) * weight
                self._peaks[name] = weight * peaks[name]
            else:
                acc.add_(tensor.to(acc.dtype), alpha=weight)
                self._peaks[name] = self._peaks.get(name, 0.0) + weight * peaks[name]
        self.total_weight += weight
        self.count += 1

    def _staged(self, state: Mapping[str, torch.Tensor], weight: float, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """New sums for ``names`` computed in float64 on copies; raises before anything is committed."""
        staged: dict[str, torch.Tensor] = {}
        for name in names:
            tensor = state[name]
            dtype = accumulator_dtype(tensor.dtype)
            acc = self._sums.get(name)
            exact = tensor.to(torch.float64) * weight
            if acc is not None:
                exact += acc.to(torch.float64)
            peak = _abs_max(exact)
            if not peak < _largest(dtype):
                raise AccumulatorOverflow(
                    f"tensor {name!r}: the weighted sum would reach {peak:.3g}, beyond the largest {dtype} "
                    f"({_largest(dtype):.3g})"
                )
            staged[name] = exact.to(dtype)
        return staged

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean in each tensor's original dtype; consumes the accumulator (no extra copy)."""
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


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [name for name, t in state.items() if (t.is_floating_point() or t.is_complex()) and not _all_finite(t)]


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
    peak = 0.0
    for part in torch.split(tensor.reshape(-1), chunk):
        value = float(part.abs().max())
        if math.isnan(value):
            return math.inf
        peak = max(peak, value)
    return peak


def update_norm(state: Mapping[str, torch.Tensor], chunk: int = 1 << 18) -> float:
    """The L2 norm of a state's floating-point tensors, computed in float64 slice by slice (inf for NaN/inf).

    Integer and bool buffers (step counters, masks) are left out: they are values, not a direction of change.
    """
    total = 0.0
    for tensor in state.values():
        if not _floating(tensor.dtype):
            continue
        for part in torch.split(tensor.reshape(-1), chunk):
            values = part.abs() if part.is_complex() else part
            total += float(values.to(torch.float64).square().sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 18) -> bool:
    # In slices: isfinite over a whole large tensor would allocate temporaries the size of the model.
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in torch.split(flat, chunk))


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
