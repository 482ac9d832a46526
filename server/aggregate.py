"""Aggregation arithmetic as plain functions and small accumulators over tensor dicts. No I/O.

:class:`WeightedSum` folds one update at a time into a running sum, so the coordinator holds one accumulator
per tensor however many workers answer. Floating-point tensors accumulate in their own precision (float32 for
float16/bfloat16); integer and bool buffers (e.g. BatchNorm's ``num_batches_tracked``) accumulate in float64 and
come back as the rounded weighted mean in their own dtype (bool: a weighted majority), never as floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["WeightedSum", "accumulator_dtype", "non_finite", "add_scaled"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype.is_floating_point or dtype.is_complex:
        return dtype
    return torch.float64


class WeightedSum:
    """``sum_i w_i * state_i`` and ``sum_i w_i``, folded in the order updates are added."""

    def __init__(self) -> None:
        self.total_weight = 0.0
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if self.count and state.keys() != self._sums.keys():
            raise ValueError("every update must have the same tensors")
        for name, tensor in state.items():
            acc = self._sums.get(name)
            if acc is None:
                self._dtypes[name] = tensor.dtype
                self._sums[name] = tensor.to(accumulator_dtype(tensor.dtype)) * weight
            else:
                acc.add_(tensor.to(acc.dtype), alpha=weight)
        self.total_weight += weight
        self.count += 1

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
    return [
        name for name, t in state.items() if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]
