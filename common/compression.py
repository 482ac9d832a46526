"""Update compression: what a worker's update looks like on the wire, and how each side gets there and back.

``training.compression`` picks one scheme for the run; the coordinator asks for it, in the training plan, only of
workers whose hello offers it (:func:`fedlink.protocol.capabilities.compress`), so an older worker keeps sending
plain updates. Compression is the last step of the worker's update pipeline (a training hook that runs after every
other hook), so it sees the update exactly as it would otherwise travel, SCAFFOLD's control-variate deltas included.

Schemes, applied to each floating-point tensor (integer and bool buffers travel as they are):

- ``float16`` / ``bfloat16``: the tensor cast down. float16 refuses values outside its range instead of sending
  infinities; bfloat16 has float32's range and fewer mantissa bits.
- ``int8``: one float32 scale per tensor (its largest magnitude over 127) and int8 values with *stochastic*
  rounding, so that the decoded tensor is an unbiased estimate of the original whatever its scale.
- ``topk``: the ``ratio`` largest magnitudes as (int32 or int64 index, value) pairs, with *error feedback*: what
  was not sent is added to the next round's update before choosing (Stich et al., NeurIPS 2018; Karimireddy et
  al., ICML 2019), so every coordinate gets through eventually. The residual lives in the worker's per-run store;
  a worker that lost it (restarted) starts again from zero and says so. Small tensors (fewer than ``dense_below``
  entries: biases, norms, a classifier head) travel dense and exact, as in Deep Gradient Compression (Lin et al.,
  ICLR 2018). They are a sliver of the bytes (0.8% of the MNIST CNN's), but a classifier head that gets 1% of its
  entries a round learns slowly: with every tensor sparse, ``bench/compression.py`` lost 0.93 points on IID MNIST
  and 2.43 on the pathological non-IID split; with tensors under 4,096 entries dense, 0.15 and 1.72. So does a
  tensor too small for the pairs to be cheaper than the values (``2k >= numel``).

The wire layout is a function of the dense header and the scheme alone (:func:`wire_header`), so the coordinator
checks the announced header before a byte of the update moves, exactly as for a plain update. Side tensors are
named ``compress/scale/<name>`` and ``compress/index/<name>``; the main payload keeps the tensor's own name.
Decoding (:func:`decompress`, or a tensor at a time with :class:`DecodedState`) refuses anything a well-behaved
worker cannot produce: a scale that is negative or not finite, indices out of range, repeated or out of order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedlink.protocol.spill import LazyState, slices_of, tensor_slices
from fedlink.protocol.tensors import DTYPES, StateHeader, TensorSpec

from .errors import FedlinkError
from .hooks import TrainingHook, register_hook

__all__ = [
    "CompressionName",
    "DownloadDtype",
    "CompressionSpec",
    "CompressionError",
    "CompressionHook",
    "SCALE_PREFIX",
    "INDEX_PREFIX",
    "wire_header",
    "compress",
    "decompress",
    "DecodedState",
    "download_header",
    "cast_download",
]

State = dict[str, torch.Tensor]
CompressionName = Literal["none", "float16", "bfloat16", "int8", "topk"]
DownloadDtype = Literal["float32", "float16", "bfloat16"]

log = logging.getLogger("fedlink.worker")

FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"})
SCALE_PREFIX = "compress/scale/"
INDEX_PREFIX = "compress/index/"
RESIDUAL_KEY = "compress/topk"
DENSE_BELOW = 4096
KEEP_RESIDUALS = 3  # like SCAFFOLD's c_i: a resumed or retried round starts from the residual before it


class CompressionError(FedlinkError):
    """An update cannot be compressed (values out of a format's range) or a compressed one cannot be decoded."""

    code = "bad_compression"


class CompressionSpec(BaseModel):
    """``training.compression``: the scheme, and for ``topk`` the fraction of each tensor's entries sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CompressionName = "none"
    ratio: float = Field(0.01, gt=0, le=1, description="topk: fraction of each tensor's entries sent")
    dense_below: int = Field(
        DENSE_BELOW, ge=0, description="topk: tensors with fewer entries than this travel dense and exact"
    )


def _topk_count(numel: int, ratio: float) -> int:
    return max(1, math.ceil(ratio * numel))


def _sparse(numel: int, spec: CompressionSpec) -> bool:
    """Whether ``topk`` sends this tensor as (index, value) pairs: a tensor of at least ``dense_below`` entries, where
    the pairs take less than the values."""
    return numel >= max(1, spec.dense_below) and 2 * _topk_count(numel, spec.ratio) < numel


def _index_dtype(numel: int) -> str:
    return "int32" if numel <= 2**31 - 1 else "int64"


def wire_header(header: StateHeader, spec: CompressionSpec) -> StateHeader:
    """The tensors a worker sends for an update of ``header`` compressed with ``spec``, in order."""
    if spec.name == "none":
        return header
    out: list[TensorSpec] = []
    for t in header.tensors:
        if t.dtype not in FLOATING:
            out.append(t)
        elif spec.name in ("float16", "bfloat16"):
            out.append(TensorSpec(name=t.name, dtype=spec.name, shape=t.shape))
        elif spec.name == "int8":
            out += [TensorSpec(name=t.name, dtype="int8", shape=t.shape),
                    TensorSpec(name=SCALE_PREFIX + t.name, dtype="float32", shape=())]
        elif _sparse(t.numel, spec):
            k = _topk_count(t.numel, spec.ratio)
            out += [TensorSpec(name=t.name, dtype=t.dtype, shape=(k,)),
                    TensorSpec(name=INDEX_PREFIX + t.name, dtype=_index_dtype(t.numel), shape=(k,))]
        else:
            out.append(t)
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise CompressionError(f"compressed update would repeat tensor names: {', '.join(clash[:5])}")
    return StateHeader(tensors=tuple(out))


def compress(
    update: State, spec: CompressionSpec, *, generator: torch.Generator, residual: State | None = None
) -> tuple[State, State]:
    """``update`` as it travels under ``spec``, and (``topk``) the new error-feedback residual.

    ``residual`` is what earlier rounds did not send (``topk`` only; missing entries count as zero). ``generator``
    draws the stochastic rounding of ``int8``, so a round repeats bit for bit under the plan's seed.
    """
    if spec.name == "none":
        return dict(update), {}
    wire: State = {}
    kept: State = {}
    for name, value in update.items():
        if not value.is_floating_point():
            wire[name] = value
            continue
        if not bool(torch.isfinite(value).all()):
            raise CompressionError(f"update tensor {name!r} holds NaN or infinite values")
        if spec.name in ("float16", "bfloat16"):
            cast = value.to(DTYPES[spec.name])
            if not bool(torch.isfinite(cast).all()):
                largest = float(value.abs().max())
                raise CompressionError(
                    f"update tensor {name!r} does not fit {spec.name} (largest magnitude {largest:.4g}); "
                    "use training.compression bfloat16"
                )
            wire[name] = cast
        elif spec.name == "int8":
            wire[name], wire[SCALE_PREFIX + name] = _quantise(value, generator)
        else:
            if not _sparse(value.numel(), spec):
                wire[name] = value
                continue
            carried = residual.get(name) if residual else None
            total = value.flatten() if carried is None else value.flatten() + carried.flatten().to(value.dtype)
            k = _topk_count(value.numel(), spec.ratio)
            index = torch.topk(total.abs(), k, sorted=False).indices.sort().values
            wire[name] = total[index].clone()
            wire[INDEX_PREFIX + name] = index.to(DTYPES[_index_dtype(value.numel())])
            total = total.clone() if carried is None else total
            total[index] = 0
            kept[name] = total.view(value.shape)
    return wire, kept


def _quantise(value: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values ``q`` and a scale ``s`` with ``E[q * s] = value``: stochastic rounding onto a grid of 255."""
    largest = float(value.abs().max()) if value.numel() else 0.0
    scale = torch.tensor(largest / 127.0, dtype=torch.float32)
    if largest == 0.0:
        return torch.zeros(value.shape, dtype=torch.int8), scale
    # A slice at a time: the float64 work and noise of a whole tensor would be four times its size, twice.
    out = torch.empty(value.shape, dtype=torch.int8)
    flat, packed = value.reshape(-1), out.view(-1)
    for start, piece in slices_of(flat):
        work = piece.to(torch.float64) / float(scale)
        work += torch.rand(work.shape, generator=generator, dtype=torch.float64)
        packed[start : start + piece.numel()] = work.floor_().clamp_(-127, 127)
    return out, scale


def decompress(wire: State, header: StateHeader, spec: CompressionSpec) -> State:
    """The dense update of ``header`` from what the worker sent (already checked against :func:`wire_header`), all
    at once. The coordinator decodes a tensor at a time instead (:class:`DecodedState`)."""
    if spec.name == "none":
        return wire
    decoded = DecodedState(wire, header, spec)
    return {name: decoded[name] for name in decoded}


def _check_wire(wire: Mapping[str, torch.Tensor], header: StateHeader, spec: CompressionSpec) -> None:
    """Refuse anything a well-behaved worker cannot produce, before a tensor is decoded: every side tensor is
    checked up front (they are small), so a bad encoding is refused whole and never halfway through a fold."""
    for t in header.tensors:
        if t.dtype not in FLOATING:
            continue
        if spec.name == "int8":
            scale = float(wire[SCALE_PREFIX + t.name])
            if not (math.isfinite(scale) and scale >= 0):
                raise CompressionError(f"tensor {t.name!r}: int8 scale {scale!r} is not a finite non-negative number")
        elif spec.name == "topk" and INDEX_PREFIX + t.name in wire:
            index = wire[INDEX_PREFIX + t.name]
            if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= t.numel):
                raise CompressionError(f"tensor {t.name!r}: top-k index out of range 0..{t.numel - 1}")
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                raise CompressionError(f"tensor {t.name!r}: top-k indices repeat or are out of order")


def _decode(t: TensorSpec, wire: Mapping[str, torch.Tensor], spec: CompressionSpec) -> torch.Tensor:
    sent = wire[t.name]
    dtype = DTYPES[t.dtype]
    if t.dtype not in FLOATING:
        return sent
    if spec.name in ("float16", "bfloat16"):
        return sent.to(dtype)
    if spec.name == "int8":
        return (sent.to(torch.float64) * float(wire[SCALE_PREFIX + t.name])).to(dtype)
    if INDEX_PREFIX + t.name not in wire:  # a small tensor, sent dense
        return sent
    index = wire[INDEX_PREFIX + t.name]
    flat = torch.zeros(t.numel, dtype=dtype)
    flat[index.to(torch.int64)] = sent
    return flat.view(t.shape)


class DecodedState(LazyState):
    """A compressed update decoded only when read: a slice at a time by :func:`tensor_slices` (the check and the
    fold), a tensor at a time by ``state[name]``. Folding it holds the update as sent (in memory, or on disk when
    it was spilled) and one decoded slice, never the dense update: decoded whole, an int8 update waiting for its
    turn in the fold would hold four times its wire size, and a top-k 1% one fifty times.

    Reading a tensor twice decodes it twice (the scan, then the fold): decoding costs far less than holding it.
    Every side tensor (scales, indices) is checked when the state is made, so a hostile encoding is refused before
    any of it is read (:class:`CompressionError`).
    """

    def __init__(self, wire: Mapping[str, torch.Tensor], header: StateHeader, spec: CompressionSpec) -> None:
        _check_wire(wire, header, spec)
        self._wire = wire
        self._specs = header.by_name()
        self._spec = spec
        super().__init__(tuple(self._specs))

    def _has(self, name: str) -> bool:
        return name in self._specs

    def _make(self, name: str) -> torch.Tensor:
        return _decode(self._specs[name], self._wire, self._spec)

    def _meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        spec = self._specs[name]
        return DTYPES[spec.dtype], spec.shape

    def _slices(self, name: str, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Decoded a slice at a time, at the same boundaries and to the same bits as slicing the whole decoded
        tensor: checking and folding a tensor of any size holds one decoded slice."""
        t = self._specs[name]
        sparse = self._spec.name == "topk" and INDEX_PREFIX + name in self._wire
        if t.dtype not in FLOATING or (self._spec.name == "topk" and not sparse):
            yield from tensor_slices(self._wire, name, elements)  # sent as it is
            return
        dtype = DTYPES[t.dtype]
        # Decoded into one buffer per tensor, reused slice after slice (as a spilled state reads them): a fresh
        # buffer per slice left the allocator holding freed memory in every thread that decoded one.
        part = torch.empty(min(elements, t.numel), dtype=dtype)
        if not sparse:  # a cast or int8: element for element, read a slice at a time (from disk if spilled)
            int8 = self._spec.name == "int8"
            scale = float(self._wire[SCALE_PREFIX + name]) if int8 else 1.0
            wide = torch.empty(part.numel(), dtype=torch.float64) if int8 else part
            for start, piece in tensor_slices(self._wire, name, elements):
                out, exact = part[: piece.numel()], wide[: piece.numel()]
                exact.copy_(piece.reshape(-1))
                if int8:  # the same bits as (q.to(float64) * scale).to(dtype)
                    out.copy_(exact.mul_(scale))
                yield start, out
            return
        # Top-k indices are sorted (checked): each slice's entries are one run of them. Indices and values are
        # a hundredth of the tensor: read whole.
        index, sent = self._wire[INDEX_PREFIX + name], self._wire[name]
        for start in range(0, t.numel, elements):
            stop = min(start + elements, t.numel)
            bounds = torch.searchsorted(index, torch.tensor([start, stop], dtype=index.dtype))
            first, last = int(bounds[0]), int(bounds[1])
            out = part[: stop - start].zero_()
            out[index[first:last].to(torch.int64) - start] = sent[first:last]
            yield start, out


def download_header(header: StateHeader, dtype: DownloadDtype) -> StateHeader:
    """The global state's header when its floating-point tensors travel as ``dtype`` (``training.download``)."""
    if dtype == "float32":
        return header
    return StateHeader(tensors=tuple(
        TensorSpec(name=t.name, dtype=dtype, shape=t.shape) if t.dtype in FLOATING else t for t in header.tensors
    ))


def cast_download(state: State, dtype: DownloadDtype) -> State:
    """The global state as sent under ``training.download``: floating-point tensors cast, others as they are."""
    if dtype == "float32":
        return state
    target = DTYPES[dtype]
    return {name: v.to(target) if v.is_floating_point() else v for name, v in state.items()}


@register_hook
class CompressionHook(TrainingHook):
    """The update pipeline's last step: :func:`compress` with the plan's scheme, error feedback kept per run.

    The coordinator appends it to the plan after every other hook (``fedlink.server.train_stage``); it must stay
    last, since the coordinator decodes against the update every earlier hook produced.
    """

    name: ClassVar[str] = "compress"

    class Params(TrainingHook.Params):
        scheme: CompressionName
        ratio: float = Field(0.01, gt=0, le=1)
        dense_below: int = Field(DENSE_BELOW, ge=0)

    @property
    def spec(self) -> CompressionSpec:
        # From the params, not from setup(): gradient rounds and local DP never call setup.
        assert isinstance(self.params, CompressionHook.Params)
        params = self.params
        return CompressionSpec(name=params.scheme, ratio=params.ratio, dense_below=params.dense_below)

    def transform_update(self, update: State) -> State:
        residual = self._residual() if self.spec.name == "topk" else None
        wire, kept = compress(update, self.spec, generator=self.context.generator, residual=residual)
        if self.spec.name == "topk":
            server_round = self.context.server_round
            history = [(r, s) for r, s in self.context.run_state.get(RESIDUAL_KEY, []) if r < server_round]
            self.context.run_state[RESIDUAL_KEY] = [*history, (server_round, kept)][-KEEP_RESIDUALS:]
        return wire

    def _residual(self) -> State | None:
        history: list[tuple[int, State]] = self.context.run_state.get(RESIDUAL_KEY, [])
        earlier = [kept for produced, kept in history if produced < self.context.server_round]
        if earlier:
            return earlier[-1]
        self.context.metrics["compress_fresh"] = 1.0
        if self.context.server_round > 1:
            log.warning(
                "round %d: no top-k error-feedback residual for this run (restarted, or first round here): "
                "starting from zero", self.context.server_round,
            )
        return None
