"""A received state kept on disk instead of in memory, read back a slice at a time.

A coordinator that held every large update in memory until its turn in the fold would need the global model,
the running sum *and* the update at once: 3x the model, more with several uploads in flight. An update at least
``limits.spill_bytes`` large is instead written, frame by frame as it arrives, to an unnamed temporary file
(``O_TMPFILE`` where the OS has it: the file has no name another process could open, is readable by its owner
alone, and vanishes with its descriptor, even if the process is killed). It is then checked and folded a slice at
a time (:func:`tensor_slices`), so memory holds the global model, the running sum and one slice.

The file is written and read with ``write``/``pread`` (never ``mmap``): its pages stay in the kernel's page cache,
which the kernel reclaims under pressure, and do not count against the process's resident memory.
"""

from __future__ import annotations

import copy
import os
import tempfile
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TypeVar

import torch

from .errors import TransferError
from .tensors import DTYPES, StateHeader, TensorSpec

__all__ = [
    "memory_backed", "Spill", "SpillAssembler", "LazyState", "SpilledState", "SLICE_ELEMENTS", "tensor_slices",
    "tensor_meta", "slices_of", "subset",
]

#: Elements per slice when a tensor is read, checked or folded in pieces (4 MiB of float32). A power of two, so
#: slicing never moves a vectorised kernel's tail and both ways of holding an update fold to the same bits.
SLICE_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Spill:
    """Where a spilling fetch writes the state it receives (``directory``; None: the system's temporary
    directory), and from what size a caller should spill rather than hold a state in memory (``min_bytes``)."""

    directory: str | None = None
    min_bytes: int = 0

    def wanted(self, nbytes: int) -> bool:
        return nbytes >= self.min_bytes


_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def memory_backed(directory: str | None, mounts: str | None = None) -> bool:
    """Whether files in ``directory`` (None: the system's temporary directory) live in memory (tmpfs, ramfs), where
    spilling an update saves nothing. Reads ``/proc/self/mounts`` (``mounts`` replaces it); False where there is
    none."""
    if mounts is None:
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
                mounts = handle.read()
        except OSError:
            return False
    path = os.path.realpath(directory or tempfile.gettempdir())
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind in _MEMORY_FILESYSTEMS


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


def _read_into(fd: int, target: memoryview, offset: int) -> None:
    while len(target):
        got = os.preadv(fd, [target], offset)
        if got <= 0:
            raise TransferError(f"spilled state truncated at byte {offset}")
        target = target[got:]
        offset += got


class SpillAssembler:
    """Writes a state's chunks to a temporary file as they arrive; same interface as
    :class:`~fedlink.protocol.tensors.StateAssembler`, whose ``result`` is a :class:`SpilledState`."""

    def __init__(self, header: StateHeader, spill: Spill) -> None:
        self.header = header
        self.received = 0
        try:
            self._file: IO[bytes] | None = tempfile.TemporaryFile(dir=spill.directory)
        except OSError as exc:
            raise TransferError(f"cannot open a spill file in {spill.directory or tempfile.gettempdir()}: {exc}") from None

    @property
    def done(self) -> bool:
        return self.received >= self.header.nbytes

    def feed(self, data: bytes | memoryview) -> None:
        if self._file is None:
            raise TransferError("spill file already closed")
        view = memoryview(data).cast("B")
        if len(view) == 0:
            raise TransferError("empty data chunk")
        if self.received + len(view) > self.header.nbytes:
            raise TransferError(f"more bytes than the header announced ({self.header.nbytes})")
        try:
            _write_all(self._file.fileno(), view)
        except OSError as exc:
            self.close()
            raise TransferError(f"cannot write the spill file: {exc}") from None
        self.received += len(view)

    def result(self) -> "SpilledState":
        if not self.done or self._file is None:
            raise TransferError(f"state incomplete: {self.received} of {self.header.nbytes} bytes received")
        state = SpilledState(self._file, self.header)
        self._file = None  # the state owns it now
        return state

    def close(self) -> None:
        """Drop what was received (a failed or abandoned transfer): the file's space goes back at once."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class _Span:
    spec: TensorSpec
    offset: int


_Lazy = TypeVar("_Lazy", bound="LazyState")


class LazyState(Mapping[str, torch.Tensor]):
    """A state whose tensors are made only when read: from a spill file (:class:`SpilledState`), or decoded from a
    compressed update (``fedlink.compression.DecodedState``), in the sender's order, plus tensors held in memory
    (frozen parameters the worker did not send). :func:`tensor_meta`, :func:`tensor_slices` and :func:`subset`
    read one through :meth:`meta`, :meth:`slices` and :meth:`with_held`, so a check or a fold holds one slice of
    it; ``state[name]`` makes a whole tensor, for the few readers that need one (a robust strategy's median).

    ``peaks`` is filled by whoever scans the state once (the largest ``|x|`` per tensor), so the fold need not read
    it a second time to learn them. A subclass says what it has and makes its tensors; this class keeps the order
    and the held tensors.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self._held: dict[str, torch.Tensor] = {}
        self._order = names
        self._names = frozenset(names)
        self.peaks: dict[str, float] | None = None

    @abstractmethod
    def _has(self, name: str) -> bool:
        """Whether the subclass can make tensor ``name``."""

    @abstractmethod
    def _make(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, made anew."""

    @abstractmethod
    def _meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Tensor ``name``'s dtype and shape, without making it."""

    @abstractmethod
    def _slices(self, name: str, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Tensor ``name``'s ``(first element, flat slice)`` pieces; each may be overwritten by the next."""

    def with_held(self: _Lazy, order: tuple[str, ...], held: Mapping[str, torch.Tensor]) -> _Lazy:
        """The same state with tensors added from memory, in ``order`` (which may also leave some out)."""
        out = copy.copy(self)
        out._held = {**self._held, **held}
        out._order, out._names, out.peaks = order, frozenset(order), None
        missing = [name for name in order if name not in out._held and not self._has(name)]
        if missing:
            raise KeyError(f"no tensor {missing[0]!r} in the received state")
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        held = self._held.get(name)
        return held if held is not None else self._make(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Tensor ``name``'s dtype and shape, without making it."""
        held = self._held.get(name)
        return (held.dtype, tuple(held.shape)) if held is not None else self._meta(name)

    def slices(self, name: str, elements: int = SLICE_ELEMENTS) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first element, flat slice)`` pieces of tensor ``name``: each may be overwritten by the next, so use it
        (or copy it) before taking the next."""
        held = self._held.get(name)
        if held is not None:
            return iter(slices_of(held, elements))
        return self._slices(name, elements)


class SpilledState(LazyState):
    """A state whose tensors live in a spill file, in header order, plus optional tensors held in memory."""

    def __init__(self, file: IO[bytes], header: StateHeader) -> None:
        self._file = file
        self._spans: dict[str, _Span] = {}
        offset = 0
        for spec in header.tensors:
            self._spans[spec.name] = _Span(spec, offset)
            offset += spec.nbytes
        super().__init__(tuple(self._spans))

    def _has(self, name: str) -> bool:
        return name in self._spans

    def _make(self, name: str) -> torch.Tensor:
        span = self._spans[name]
        out = torch.empty(span.spec.numel, dtype=DTYPES[span.spec.dtype])
        self._read_into(span, 0, out)
        return out.reshape(span.spec.shape)

    def _meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        spec = self._spans[name].spec
        return DTYPES[spec.dtype], spec.shape

    def _slices(self, name: str, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Read from the file into one buffer. One buffer rather than one per slice: a 400 MB update is read twice
        (checked, then folded), and a fresh 4 MiB buffer per slice left the allocator holding freed memory in every
        thread that read one."""
        span = self._spans[name]
        numel = span.spec.numel
        buffer = torch.empty(min(elements, numel), dtype=DTYPES[span.spec.dtype])
        for start in range(0, numel, elements):
            part = buffer[: min(elements, numel - start)]
            self._read_into(span, start, part)
            yield start, part

    def _read_into(self, span: _Span, start: int, out: torch.Tensor) -> None:
        if not out.numel():
            return
        raw = out.view(torch.uint8).numpy().data.cast("B")
        try:
            _read_into(self._file.fileno(), raw, span.offset + start * out.element_size())
        except (OSError, ValueError) as exc:
            raise TransferError(f"cannot read tensor {span.spec.name!r} back from the spill file: {exc}") from None

    def close(self) -> None:
        self._file.close()


def slices_of(tensor: torch.Tensor, elements: int = SLICE_ELEMENTS) -> Iterable[tuple[int, torch.Tensor]]:
    """``(first element, piece)`` views of an in-memory tensor, in its row-major element order.

    A contiguous tensor gives flat slices of ``elements``; any other (a stride-0 expansion of zeros) gives blocks
    of whole rows of about that size, as views, so nothing the size of the tensor is ever made. A tensor of one
    slice comes back as a tuple (a thousand small updates a round make this path hot).
    """
    if tensor.is_contiguous() or tensor.dim() == 0:
        flat = tensor.reshape(-1)
        count = flat.numel()
        if count <= elements:
            return ((0, flat),)
        return ((start, flat[start : start + elements]) for start in range(0, count, elements))
    row = max(1, tensor[0].numel()) if tensor.shape[0] else 1
    rows = max(1, elements // row)
    return ((first * row, tensor[first : first + rows]) for first in range(0, tensor.shape[0], rows))


def subset(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> Mapping[str, torch.Tensor]:
    """The tensors ``names`` of ``state``, in that order, without reading a spilled tensor back."""
    if isinstance(state, LazyState):
        return state.with_held(names, {})
    return {name: state[name] for name in names}


def tensor_meta(state: Mapping[str, torch.Tensor], name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """Tensor ``name``'s dtype and shape, without reading a spilled tensor back."""
    if isinstance(state, LazyState):
        return state.meta(name)
    tensor = state[name]
    return tensor.dtype, tuple(tensor.shape)


def tensor_slices(
    state: Mapping[str, torch.Tensor], name: str, elements: int = SLICE_ELEMENTS
) -> Iterable[tuple[int, torch.Tensor]]:
    """Tensor ``name`` of ``state`` in pieces, read from disk if ``state`` was spilled or decoded if it was
    compressed (each piece valid until the next is taken), views otherwise."""
    if isinstance(state, LazyState):
        return state.slices(name, elements)
    return slices_of(state[name], elements)
