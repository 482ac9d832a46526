"""Updates as vectors of integers mod 2^bits: clip, weight, scale, stochastic rounding, and back.

The layout of one worker's vector: every tensor of the update flattened in the layout's order, then the sample
weight, then each aggregate metric. The weight and metrics travel inside the masked vector so that, under secure
aggregation, the coordinator learns only their sums (Bonawitz et al., CCS 2017, section 2: anything outside the
mask is revealed per worker). The coordinates are

* update: ``w * clip(delta)`` scaled by ``levels / clip_norm``, with ``w = min(samples, weight_cap) / weight_cap``;
* weight: ``w`` scaled by ``levels``;
* metric m: ``w * clamp(m, +-bound)`` scaled by ``levels / bound``.

Each is rounded stochastically (unbiased: E[q] = x) with coin flips from a ChaCha20 stream under a fresh
``secrets`` seed, then wrapped mod 2^bits. The sum over workers, read as a signed integer, is exact as long as
``contributors * levels < 2^(bits-1)``; :class:`QuantSpec` refuses any setting that could overflow, counting every
worker that can contribute, not only the survivors. Decoding divides the weighted sums by the summed weight:
the weighted mean update (FedAvg) and the weighted mean of each metric.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidUpdate, SecAggConfigError
from .prg import SEED_BYTES, UniformStream

__all__ = ["VectorLayout", "QuantSpec", "Aggregate", "layout_of", "encode_update", "decode_sum"]


class VectorLayout(BaseModel):
    """Which tensors (name, shape), in which order, then the weight, then which metrics: a vector's coordinates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    metrics: tuple[str, ...] = ()

    @property
    def update_length(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)

    @property
    def length(self) -> int:
        return self.update_length + 1 + len(self.metrics)


def layout_of(state: Mapping[str, torch.Tensor], *, metrics: tuple[str, ...] = ()) -> VectorLayout:
    """The layout of the floating-point tensors of ``state``, in its order (a model's ``state_dict`` order)."""
    tensors = tuple((name, tuple(t.shape)) for name, t in state.items() if t.is_floating_point())
    return VectorLayout(tensors=tensors, metrics=tuple(metrics))


class QuantSpec(BaseModel):
    """How floats become integers; refuses ``contributors * levels >= 2^(bits-1)`` (the sum could wrap)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=32)
    clip_norm: float = Field(gt=0, allow_inf_nan=False)
    levels: int = Field(ge=1)
    contributors: int = Field(ge=1)
    weight_cap: float = Field(gt=0, allow_inf_nan=False)
    metric_bound: float = Field(1e3, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _no_overflow(self) -> QuantSpec:
        if self.contributors * self.levels >= 1 << (self.bits - 1):
            raise SecAggConfigError(
                f"{self.contributors} workers x {self.levels} levels can overflow 2^{self.bits}: the sum must stay "
                f"below 2^{self.bits - 1}; lower levels to {((1 << (self.bits - 1)) - 1) // self.contributors} "
                "or raise bits"
            )
        return self

    @classmethod
    def for_workers(
        cls, contributors: int, *, bits: int, clip_norm: float, weight_cap: float, metric_bound: float = 1e3
    ) -> QuantSpec:
        """The finest ``levels`` that cannot overflow with ``contributors`` workers (all selected, not survivors)."""
        levels = ((1 << (bits - 1)) - 1) // max(contributors, 1)
        if levels < 1:
            raise SecAggConfigError(f"bits = {bits} leaves no room for {contributors} workers; raise bits")
        return cls(
            bits=bits, clip_norm=clip_norm, levels=levels, contributors=contributors,
            weight_cap=weight_cap, metric_bound=metric_bound,
        )  # fmt: skip


@dataclass(frozen=True)
class Aggregate:
    """A decoded sum: the weighted mean update, the total weight in samples, the weighted mean of each metric."""

    update: dict[str, torch.Tensor]
    weight: float
    metrics: dict[str, float]


def encode_update(
    update: Mapping[str, torch.Tensor],
    *,
    num_samples: int,
    metrics: Mapping[str, float],
    layout: VectorLayout,
    spec: QuantSpec,
) -> NDArray[np.uint32]:
    """One worker's vector mod 2^bits (see the module docstring); refuses tensors or metrics off the layout."""
    if set(metrics) != set(layout.metrics):
        raise InvalidUpdate(f"metrics {sorted(metrics)} differ from the layout's {sorted(layout.metrics)}")
    if num_samples < 0:
        raise InvalidUpdate(f"num_samples must be zero or more, got {num_samples}")
    squares = 0.0
    for name, shape in layout.tensors:
        tensor = update.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            got = None if tensor is None else tuple(tensor.shape)
            raise InvalidUpdate(f"tensor {name!r}: expected shape {shape}, got {got}")
        squares += float(tensor.detach().double().square().sum())
    if not math.isfinite(squares):
        raise InvalidUpdate("the update holds NaN or infinite values")
    norm = math.sqrt(squares)
    weight = min(num_samples, spec.weight_cap) / spec.weight_cap
    scale = weight * min(1.0, spec.clip_norm / norm if norm > 0 else 1.0) * spec.levels / spec.clip_norm
    coins = UniformStream(secrets.token_bytes(SEED_BYTES))
    out = np.empty(layout.length, dtype=np.uint32)
    offset = 0
    for name, _ in layout.tensors:
        flat = update[name].detach().to(torch.float64).reshape(-1).numpy()
        out[offset : offset + flat.size] = _round(flat * scale, coins, spec)
        offset += flat.size
    extras = [weight * spec.levels]
    for name in layout.metrics:
        value = float(metrics[name])
        if not math.isfinite(value):
            raise InvalidUpdate(f"metric {name!r} is {value}")
        extras.append(weight * max(-spec.metric_bound, min(spec.metric_bound, value)) * spec.levels / spec.metric_bound)
    out[offset:] = _round(np.asarray(extras, dtype=np.float64), coins, spec)
    return out


def _round(values: NDArray[np.float64], coins: UniformStream, spec: QuantSpec) -> NDArray[np.uint32]:
    floor = np.floor(values)
    rounded = floor + (coins.uniform(values.size) < values - floor)
    clipped = np.clip(rounded, -spec.levels, spec.levels).astype(np.int64)  # float error at the edge only
    wrapped: NDArray[np.uint32] = (clipped & ((1 << spec.bits) - 1)).astype(np.uint32)
    return wrapped


def decode_sum(total: NDArray[np.uint32], *, layout: VectorLayout, spec: QuantSpec) -> Aggregate:
    """The weighted means behind the unmasked sum of the contributors' vectors."""
    if total.shape != (layout.length,):
        raise InvalidUpdate(f"the sum has {total.size} values, the layout {layout.length}")
    signed = total.astype(np.int64)
    signed[signed >= 1 << (spec.bits - 1)] -= 1 << spec.bits
    weight_q = int(signed[layout.update_length])
    if weight_q <= 0:
        raise InvalidUpdate("the summed weight is zero: no contributor reported any samples")
    update: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout.tensors:
        size = math.prod(shape)
        values = signed[offset : offset + size] * (spec.clip_norm / weight_q)
        update[name] = torch.from_numpy(values.astype(np.float32)).reshape(shape)
        offset += size
    metrics = {
        name: float(signed[layout.update_length + 1 + i]) * spec.metric_bound / weight_q
        for i, name in enumerate(layout.metrics)
    }
    return Aggregate(update=update, weight=weight_q / spec.levels * spec.weight_cap, metrics=metrics)
