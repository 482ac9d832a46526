"""Model states on the wire: every tensor as name, dtype, shape and its raw little-endian bytes.

A state travels as a *header* (the ordered list of :class:`TensorSpec`, carried inside a control message) and then
the tensors' bytes back to back, cut into chunks of at most ``Limits.chunk_bytes``. Bytes are read straight from
each tensor's own buffer when sending and written straight into a freshly allocated tensor when receiving, so a
state is copied once per hop and never held twice. :func:`encode_state` / :func:`decode_state` pack the same
header and bytes into one msgpack document for the cases (files, tests, benchmarks) that want a single blob.

No pickle, ever: a dtype is a name from :data:`DTYPES`, a shape a list of ints, the data plain bytes.
"""

from __future__ import annotations

import gc
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LimitExceeded, MalformedFrame, StateMismatch, TransferError
from .limits import Limits

__all__ = [
    "DTYPES",
    "TensorSpec",
    "StateHeader",
    "State",
    "header_of",
    "check_header",
    "iter_state_chunks",
    "iter_state_pieces",
    "StateAssembler",
    "encode_state",
    "decode_state",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today is little-endian
    raise ImportError("fedlink's wire format is little-endian; big-endian hosts are not supported")

State = dict[str, torch.Tensor]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}


class TensorSpec(BaseModel):
    """What a tensor is, without its values: enough to allocate it and to check it against a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    dtype: str
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unsupported dtype {value!r}; expected one of {', '.join(DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if value and min(value) < 0:
            raise ValueError(f"negative dimension in shape {list(value)}")
        return value

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


class StateHeader(BaseModel):
    """The ordered tensor list of a state; the bytes that follow are these tensors in this order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}


#: Specs already made, by (name, dtype, shape). A model's layout is the same every round, and a coordinator sends it
#: to every worker, so after the first state each header is lookups: a fifth of building it, which is what states
#: of many thousand small tensors spend their header time on. Specs are immutable, so sharing them is safe; the
#: cache is emptied when it outgrows any one state the limits allow, so it never holds more than about two.
_SPECS: dict[tuple[str, torch.dtype, torch.Size], TensorSpec] = {}
_SPECS_MAX = 2 * Limits().max_tensors


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    key = (name, tensor.dtype, tensor.shape)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= _SPECS_MAX:
            _SPECS.clear()
        spec = _SPECS[key] = _new_spec(name, tensor)
    return spec


def _new_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    dtype = _NAMES.get(tensor.dtype)
    if dtype is None:
        raise StateMismatch(f"tensor {name!r} has dtype {tensor.dtype}, which fedlink cannot send")
    if not name:
        raise StateMismatch("a tensor with an empty name cannot be sent")
    # Our own tensors need no validation (the dtype is known, torch shapes are non-negative ints).
    return _trusted_spec(name, dtype, tuple(tensor.shape))


_SPEC_FIELDS = frozenset(TensorSpec.model_fields)
_new_object = object.__new__
_set_attribute = object.__setattr__


def _construct_spec(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    """``TensorSpec.model_construct`` in a third of its time, which is a third of a state header's cost for states of
    many thousand small tensors. It sets what pydantic's own constructor sets (the model's documented instance
    attributes); :func:`_pick_spec_constructor` checks it against ``model_construct`` once and falls back if a
    pydantic version differs."""
    spec = _new_object(TensorSpec)
    _set_attribute(spec, "__dict__", {"name": name, "dtype": dtype, "shape": shape})
    _set_attribute(spec, "__pydantic_fields_set__", set(_SPEC_FIELDS))
    _set_attribute(spec, "__pydantic_extra__", None)
    _set_attribute(spec, "__pydantic_private__", None)
    return spec


def _pick_spec_constructor() -> Callable[[str, str, tuple[int, ...]], TensorSpec]:
    def construct(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec.model_construct(name=name, dtype=dtype, shape=shape)

    try:
        fast, reference = _construct_spec("w", "float32", (2, 3)), construct("w", "float32", (2, 3))
        same = (
            fast == reference
            and hash(fast) == hash(reference)
            and fast.model_dump() == reference.model_dump()
            and fast.model_fields_set == reference.model_fields_set
            and vars(fast) == vars(reference)
        )
    except Exception:  # noqa: BLE001 - any difference at all means: use pydantic's own constructor
        same = False
    return _construct_spec if same else construct


_trusted_spec = _pick_spec_constructor()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a burst of many small allocations that make no cycles.

    A state of 10,000 small tensors allocates tens of thousands of objects (specs, views, tensors) in a few
    milliseconds; each 700 of them start a collection that walks every young object, and every tenth of those walks
    older ones too: two thirds of the wire path's time went to collections that could find nothing. Whoever
    paused the collector resumes it, so another thread's pause never leaves it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def header_of(state: Mapping[str, torch.Tensor]) -> StateHeader:
    """The header describing ``state`` (in its iteration order)."""
    with _collector_paused():
        return StateHeader.model_construct(tensors=tuple(_spec(name, t) for name, t in state.items()))


def check_header(header: StateHeader, limits: Limits, *, expected: StateHeader | None = None) -> None:
    """Refuse a header that breaks ``limits`` or differs from ``expected`` -- before any byte is transferred.

    ``expected`` compares names, dtypes and shapes as sets of names, so a peer cannot make us allocate tensors a
    model does not have.
    """
    if len(header.tensors) > limits.max_tensors:
        raise LimitExceeded(f"state has {len(header.tensors)} tensors, limit is {limits.max_tensors}")
    seen: set[str] = set()
    for spec in header.tensors:
        if spec.name in seen:
            raise MalformedFrame(f"state names tensor {spec.name!r} twice")
        seen.add(spec.name)
        if len(spec.name) > limits.max_name_chars:
            raise LimitExceeded(f"tensor name of {len(spec.name)} characters, limit is {limits.max_name_chars}")
        if len(spec.shape) > limits.max_dims:
            raise LimitExceeded(f"tensor {spec.name!r} has {len(spec.shape)} dimensions, limit is {limits.max_dims}")
        if spec.numel > limits.max_tensor_elements:
            raise LimitExceeded(
                f"tensor {spec.name!r} has {spec.numel} elements, limit is {limits.max_tensor_elements}"
            )
    if header.nbytes > limits.max_state_bytes:
        raise LimitExceeded(f"state of {header.nbytes} bytes, limit is {limits.max_state_bytes}")
    if expected is not None:
        _compare(header, expected)


def _compare(got: StateHeader, expected: StateHeader) -> None:
    want = expected.by_name()
    have = got.by_name()
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    problems: list[str] = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    for name in want.keys() & have.keys():
        if want[name] != have[name]:
            problems.append(f"{have[name].describe()} where {want[name].describe()} was expected")
    if problems:
        raise StateMismatch("model state does not match the model: " + "; ".join(sorted(problems)[:8]))


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying (a contiguous CPU copy is made only when it is not one already)."""
    try:
        # The common case -- a contiguous CPU tensor of a dtype numpy knows, outside autograd -- in two calls,
        # which is what keeps states of many thousand small tensors cheap. Anything else makes one of these raise.
        return memoryview(tensor.numpy()).cast("B")  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        pass
    # resolve_conj/resolve_neg: a lazily conjugated (or negated) view cannot be reinterpreted as bytes; both are
    # no-ops for every other tensor.
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def _raw_views(state: Mapping[str, torch.Tensor], header: StateHeader) -> list[memoryview]:
    """Every tensor's bytes in ``header`` order, as views, made in one burst (see :func:`_collector_paused`)."""
    views: list[memoryview] = []
    with _collector_paused():
        for spec in header.tensors:
            # A header that does not describe the state (missing tensor, other dtype or shape) must fail as a
            # StateMismatch -- which the session reports to the peer -- not as a KeyError or as misread bytes.
            tensor = state.get(spec.name)
            if tensor is None or tensor.dtype is not DTYPES[spec.dtype] or tensor.shape != spec.shape:
                raise StateMismatch(f"tensor {spec.name!r} changed while being sent")
            views.append(_raw(tensor))
    return views


def iter_state_pieces(
    state: Mapping[str, torch.Tensor], header: StateHeader, chunk_bytes: int
) -> Iterator[list[memoryview]]:
    """The state's bytes in ``header`` order, as lists of views that add up to at most ``chunk_bytes`` each.

    Nothing is copied: a chunk of many small tensors is the list of their views, which the frame encoder joins
    behind its header in one go (:func:`~fedlink.protocol.frames.encode_data`).
    """
    pending: list[memoryview] = []
    pending_size = 0
    for raw in _raw_views(state, header):
        size = len(raw)
        if size + pending_size < chunk_bytes:
            # Most tensors of a many-tensor state are small: they are only collected here.
            if size:
                pending.append(raw)
                pending_size += size
            continue
        offset = 0
        while offset < size:
            take = min(chunk_bytes - pending_size, size - offset)
            pending.append(raw[offset : offset + take] if take < size else raw)
            pending_size += take
            offset += take
            if pending_size == chunk_bytes:
                yield pending
                pending, pending_size = [], 0
    if pending:
        yield pending


def iter_state_chunks(state: Mapping[str, torch.Tensor], header: StateHeader, chunk_bytes: int) -> Iterator[memoryview]:
    """The state's bytes in ``header`` order, as buffers of at most ``chunk_bytes`` (a view where one tensor fills
    the chunk, else the pieces joined)."""
    for pieces in iter_state_pieces(state, header, chunk_bytes):
        yield pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))


#: Tensors smaller than this are received into one buffer shared with their neighbours of the same dtype...
_SMALL_TENSOR_BYTES = 64 * 1024
#: ... of at most this many bytes, so that a kept small tensor keeps at most this much memory alive.
_SHARED_BUFFER_BYTES = 1 << 20


def _groups(specs: tuple[TensorSpec, ...]) -> list[tuple[int, int, list[int]]]:
    """``(first, end, numels)``: index ranges of ``specs`` that are received into one buffer each.

    A large tensor is a range of its own. Runs of small tensors of one dtype share a buffer: each then costs one
    split of that buffer instead of an allocation and a copy of its own, which is what states of thousands of
    small tensors (biases, norms, adapters) spend their time on.
    """
    groups: list[tuple[int, int, list[int]]] = []
    first = 0
    count = len(specs)
    while first < count:
        dtype = specs[first].dtype
        itemsize = _ITEMSIZE[dtype]
        numel = math.prod(specs[first].shape)
        numels = [numel]
        nbytes = numel * itemsize
        end = first + 1
        if nbytes < _SMALL_TENSOR_BYTES:
            while end < count and specs[end].dtype == dtype:
                numel = math.prod(specs[end].shape)
                size = numel * itemsize
                if size >= _SMALL_TENSOR_BYTES or nbytes + size > _SHARED_BUFFER_BYTES:
                    break
                numels.append(numel)
                nbytes += size
                end += 1
        groups.append((first, end, numels))
        first = end
    return groups


class StateAssembler:
    """Rebuilds a state from its chunks, allocating each tensor once and writing bytes straight into it.

    Small tensors of one dtype that follow each other are allocated together (see :func:`_groups`) and handed out
    as views of their shared buffer.
    """

    def __init__(self, header: StateHeader) -> None:
        self.header = header
        self._specs = header.tensors
        self._groups = _groups(self._specs)
        self._group = 0
        self._filled = 0
        self._current: np.ndarray | None = None
        self._current_tensor: torch.Tensor | None = None
        self.received = 0
        self.state: State = {}
        self._advance()

    @property
    def done(self) -> bool:
        return self._group >= len(self._groups)

    def _advance(self) -> None:
        # Zero-sized tensors are complete before any byte arrives.
        while self._group < len(self._groups):
            first, _, numels = self._groups[self._group]
            tensor = torch.empty(sum(numels), dtype=DTYPES[self._specs[first].dtype])
            self._current_tensor = tensor
            self._filled = 0
            if tensor.numel() == 0:
                self._complete()
                continue
            self._current = tensor.view(torch.uint8).numpy()
            return
        self._current = None
        self._current_tensor = None

    def _complete(self) -> None:
        """Hand out the tensors of the filled group and move on to the next."""
        assert self._current_tensor is not None
        first, end, numels = self._groups[self._group]
        if end - first == 1:
            spec = self._specs[first]
            self.state[spec.name] = self._current_tensor.reshape(spec.shape)
        else:
            state = self.state
            with _collector_paused():
                for spec, part in zip(self._specs[first:end], self._current_tensor.split_with_sizes(numels)):
                    # The split hands out 1-d views already: only other shapes need a view of their own.
                    state[spec.name] = part if len(spec.shape) == 1 else part.view(spec.shape)
        self._group += 1

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if len(view) == 0:
            raise TransferError("empty data chunk")
        pos = 0
        while pos < len(view):
            if self._current is None or self._current_tensor is None:
                raise TransferError(f"more bytes than the header announced ({self.header.nbytes})")
            take = min(len(view) - pos, len(self._current) - self._filled)
            self._current[self._filled : self._filled + take] = np.frombuffer(view[pos : pos + take], dtype=np.uint8)
            self._filled += take
            pos += take
            if self._filled == len(self._current):
                self._complete()
                self._advance()
        self.received += len(view)

    def result(self) -> State:
        if not self.done:
            raise TransferError(f"state incomplete: {self.received} of {self.header.nbytes} bytes received")
        return self.state


_DOC_VERSION = 1


def encode_state(state: Mapping[str, torch.Tensor]) -> memoryview:
    """One msgpack document: ``{"v": 1, "tensors": [{"name", "dtype", "shape", "data"}, ...]}`` (bytes-like)."""
    header = header_of(state)
    doc: dict[str, Any] = {
        "v": _DOC_VERSION,
        "tensors": [
            {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape), "data": _raw(state[spec.name])}
            for spec in header.tensors
        ],
    }
    # packb would copy the document twice (its growing buffer, then a new bytes); the packer's own buffer is
    # handed out instead.
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack(doc)
    return packer.getbuffer()  # type: ignore[no-any-return]


def decode_state(data: bytes | memoryview, limits: Limits | None = None) -> State:
    """Inverse of :func:`encode_state`; every failure is a :class:`MalformedFrame` or :class:`LimitExceeded`."""
    limits = limits or Limits()
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=limits.max_state_bytes,
            max_array_len=max(limits.max_tensors, limits.max_dims),
            max_map_len=16,
            max_str_len=max(limits.max_name_chars, 64),
            max_ext_len=0,
            strict_map_key=True,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedFrame(f"not a fedlink state document: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != _DOC_VERSION or not isinstance(doc.get("tensors"), list):
        raise MalformedFrame("not a fedlink state document (expected a map with v=1 and a tensor list)")
    entries = doc["tensors"]
    try:
        header = StateHeader(
            tensors=tuple(
                TensorSpec(name=e["name"], dtype=e["dtype"], shape=tuple(e["shape"])) for e in entries
            )
        )
    except (KeyError, TypeError, ValidationError) as exc:
        raise MalformedFrame(f"bad tensor entry in state document: {exc}") from exc
    check_header(header, limits)
    state: State = {}
    with warnings.catch_warnings():
        # msgpack hands back immutable bytes, and torch warns that it cannot make them writable (see _view).
        warnings.simplefilter("ignore", UserWarning)
        for spec, entry in zip(header.tensors, entries):
            raw = entry.get("data")
            if not isinstance(raw, bytes) or len(raw) != spec.nbytes:
                raise MalformedFrame(f"tensor {spec.name!r}: expected {spec.nbytes} bytes of data")
            state[spec.name] = _view(raw, spec)
    return state


def _view(raw: bytes, spec: TensorSpec) -> torch.Tensor:
    """A tensor over ``raw`` itself (no copy); the tensor keeps ``raw`` alive.

    msgpack hands back immutable ``bytes``; torch warns that it cannot make them writable (the caller silences
    that). The decoded state is owned by the caller alone, so writing to it is as safe as to any fresh tensor.
    """
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
    return torch.frombuffer(raw, dtype=torch.uint8).view(DTYPES[spec.dtype]).reshape(spec.shape)
