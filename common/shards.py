"""The shard format: a worker's private data set, and the coordinator's held-out evaluation set.

A shard is one file of samples ``x`` and integer labels ``y``, in one of two numpy layouts:

* ``.npy``: a 1-D structured array with a field ``x`` (each record holds one sample, a subarray of any shape
  and any real numeric dtype) and a field ``y`` (an integer label); this is what :func:`save_shard` writes;
* ``.npz``: an archive with arrays ``x`` of shape ``(N, ...)`` and ``y`` of shape ``(N,)``.

Shards are read with ``allow_pickle=False`` and nothing else: a numpy file can carry pickled objects, and
unpickling runs code. Never change that. :func:`load_shard` turns every problem with a file's content into a
:class:`~fedlink.errors.DataError` naming the file and the problem, so a worker can refuse to start with one
clear line instead of failing mid-round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import DataError

__all__ = ["SUFFIXES", "Shard", "load_shard", "save_shard"]

#: The file suffixes a shard may have; anything else is refused before the file is opened.
SUFFIXES: tuple[str, ...] = (".npy", ".npz")

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or an empty zip's end record
_FEATURE_KINDS = "biuf"  # bool, signed, unsigned, float: what a model can take as input
_LABEL_KINDS = "iu"
_INT64_MAX = np.iinfo(np.int64).max
_OBJECTS = "holds Python objects (object dtype); shards are never unpickled, store numbers only"


@dataclass(frozen=True, eq=False, repr=False)
class Shard:
    """A validated shard held in memory; build it with :func:`load_shard`, which does the checking.

    ``x`` and ``y`` are read-only, native-byte-order arrays, so that a shard stays what was validated and
    converts to tensors without surprises.
    """

    path: Path
    x: np.ndarray
    y: np.ndarray

    def __repr__(self) -> str:
        return (
            f"Shard(path={str(self.path)!r}, num_samples={self.num_samples}, "
            f"sample_shape={self.sample_shape}, x_dtype={self.x_dtype!r})"
        )

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample, what a coordinator compares with the model's expected input."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def x_dtype(self) -> str:
        return str(self.x.dtype.name)

    @property
    def num_classes_seen(self) -> int:
        """How many distinct labels this shard holds; under label skew that is fewer than the model's classes."""
        return int(np.unique(self.y).size)

    @property
    def max_label(self) -> int:
        """The largest label: a model for this shard needs at least ``max_label + 1`` outputs."""
        return int(self.y.max())

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy into fresh tensors ``(x, y)`` with ``y`` as int64, the dtype ``cross_entropy`` requires.

        Wide unsigned features become int64 because torch's uint16/32/64 support few operations; everything
        else keeps its dtype, so converting to the model's float type stays the trainer's choice.
        """
        x = self.x
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:
            x = x.astype(np.int64)
        return torch.tensor(x), torch.tensor(self.y.astype(np.int64))


def load_shard(path: str | os.PathLike[str]) -> Shard:
    """Read and validate a shard file, raising :class:`DataError` for anything unusable in it.

    The checks cover what would otherwise fail late and obscurely in training: a missing or foreign file,
    pickled or object data, missing fields, an empty shard, ``x``/``y`` length mismatch, non-integer or
    negative labels, and NaN or infinite float features.
    """
    path = Path(path)
    where = f"shard {str(path)!r}"
    if not path.exists():
        raise DataError(f"{where}: no such file")
    if not path.is_file():
        raise DataError(f"{where}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{where}: unsupported suffix {path.suffix!r}; expected .npy (a structured array with fields "
            "'x' and 'y') or .npz (arrays 'x' and 'y')"
        )
    try:
        with path.open("rb") as file:
            magic = file.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{where}: cannot read: {exc}") from exc
    x, y = _read_npy(path, where, magic) if suffix == ".npy" else _read_npz(path, where, magic)
    x, y = _checked(where, x, y)
    # These are our own copies; read-only keeps what was validated as it was, as the frozen shard promises.
    x.flags.writeable = False
    y.flags.writeable = False
    return Shard(path=path, x=x, y=y)


def save_shard(path: str | os.PathLike[str], x: Any, y: Any) -> Path:
    """Write ``x`` and ``y`` as a shard, ``.npy`` (structured) or ``.npz`` by the suffix, and return the path.

    The data is validated with the same rules as :func:`load_shard` first, so a file this writes always loads;
    it is written to a temporary name and renamed, so a reader never sees half a shard.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"cannot write shard {str(path)!r}: unsupported suffix {path.suffix!r}; use .npy or .npz")
    x, y = _checked(f"refusing to write shard {str(path)!r}", np.asarray(x), np.asarray(y))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as file:
            if suffix == ".npy":
                records = np.empty(y.shape[0], dtype=[("x", x.dtype, x.shape[1:]), ("y", y.dtype)])
                records["x"] = x
                records["y"] = y
                np.save(file, records, allow_pickle=False)
            else:
                np.savez(file, x=x, y=y)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write shard {str(path)!r}: {exc}") from exc
    return path


def _read_npy(path: Path, where: str, magic: bytes) -> tuple[np.ndarray, np.ndarray]:
    if magic.startswith(_ZIP_MAGICS):
        raise DataError(f"{where}: holds a zip archive (.npz content); rename it to .npz")
    if magic != _NPY_MAGIC:
        raise DataError(f"{where}: not a numpy .npy file (no numpy header); pickles and other formats are refused")
    try:
        with path.open("rb") as file:
            objects = _declares_objects(file)
    except OSError as exc:
        raise DataError(f"{where}: cannot read: {exc}") from exc
    if objects:
        raise DataError(f"{where}: {_OBJECTS}")
    try:
        # Memory-mapping first means a header that claims a huge shape fails on the file size, instead of
        # allocating whatever the header says before noticing the data is not there.
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy reports corrupt content as ValueError, EOFError, OSError, ...
        raise DataError(f"{where}: unreadable .npy file: {type(exc).__name__}: {exc}") from exc
    try:
        names = records.dtype.names
        if names is None:
            raise DataError(
                f"{where}: holds a plain {records.dtype} array of shape {records.shape}, not a structured array "
                "with fields 'x' and 'y' (fedlink.shards.save_shard writes that format), or use .npz with "
                "arrays 'x' and 'y'"
            )
        missing = [field for field in ("x", "y") if field not in names]
        if missing:
            raise DataError(f"{where}: structured array lacks field(s) {missing}; it has {list(names)}")
        if records.ndim != 1:
            raise DataError(f"{where}: expected a 1-D array of records, one per sample, got shape {records.shape}")
        try:
            return np.array(records["x"]), np.array(records["y"])
        except Exception as exc:  # the mapped data could not be read back: corrupt or changing file
            raise DataError(f"{where}: unreadable .npy data: {type(exc).__name__}: {exc}") from exc
    finally:
        del records  # release the memory map (and the open file) now, not at the next collection


def _read_npz(path: Path, where: str, magic: bytes) -> tuple[np.ndarray, np.ndarray]:
    if magic == _NPY_MAGIC:
        raise DataError(f"{where}: holds a single array (.npy content); rename it to .npy")
    if not magic.startswith(_ZIP_MAGICS):
        raise DataError(f"{where}: not a numpy .npz archive; pickles and other formats are refused")
    try:
        # Opening the file here, not in np.load, closes it even when numpy fails building the archive (it
        # leaks its own handle then).
        with path.open("rb") as file, np.load(file, allow_pickle=False) as archive:
            missing = [name for name in ("x", "y") if name not in archive.files]
            if missing:
                raise DataError(f"{where}: archive lacks array(s) {missing}; it has {sorted(archive.files)}")
            for name in ("x", "y"):
                with archive.zip.open(f"{name}.npy") as member:
                    if _declares_objects(member):
                        raise DataError(f"{where}: array {name!r} {_OBJECTS}")
            return np.asarray(archive["x"]), np.asarray(archive["y"])
    except DataError:
        raise
    except Exception as exc:  # a corrupt zip or member surfaces as BadZipFile, ValueError, EOFError, zlib.error, ...
        raise DataError(f"{where}: unreadable .npz archive: {type(exc).__name__}: {exc}") from exc


def _declares_objects(file: BinaryIO) -> bool:
    """Whether a .npy header declares Python objects; False if it cannot be parsed (loading will say why).

    Asking the header gives a precise message without matching the wording of numpy's own errors.
    """
    try:
        version = np.lib.format.read_magic(file)
        # Versions 2.0 and 3.0 share one header layout; 3.0 only allows UTF-8 field names.
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read(file)
    except Exception:  # a corrupt header: np.load reports it with numpy's own detail
        return False
    return bool(dtype.hasobject)


def _checked(where: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a shard's arrays and return them contiguous and in native byte order (torch refuses others)."""
    if x.dtype.hasobject or y.dtype.hasobject:
        raise DataError(f"{where}: {_OBJECTS}")
    if y.ndim != 1:
        raise DataError(f"{where}: labels y must be 1-D (one per sample), got shape {y.shape}")
    if x.ndim < 1:
        raise DataError(f"{where}: features x must have a leading sample axis, got a scalar")
    if y.shape[0] == 0:
        raise DataError(f"{where}: empty shard (no samples)")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if x.dtype.kind not in _FEATURE_KINDS:
        raise DataError(f"{where}: features x have unsupported dtype {x.dtype}; expected bool, integer or float")
    if y.dtype.kind not in _LABEL_KINDS:
        raise DataError(
            f"{where}: labels y must be integers, got dtype {y.dtype}"
            + ("; convert whole-number labels with y.astype(np.int64)" if y.dtype.kind == "f" else "")
        )
    if y.dtype.kind == "i" and (negative := int(np.count_nonzero(y < 0))):
        first = int(np.flatnonzero(y < 0)[0])
        raise DataError(f"{where}: {negative} negative label(s), first at sample {first} (y={int(y[first])})")
    if y.dtype == np.uint64 and int(y.max()) > _INT64_MAX:
        raise DataError(f"{where}: labels exceed the int64 range")
    if x.dtype == np.uint64 and x.size and int(x.max()) > _INT64_MAX:
        raise DataError(f"{where}: uint64 features exceed the int64 range torch can hold")
    if x.dtype.kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            first = int(np.flatnonzero(~finite.reshape(x.shape[0], -1).all(axis=1))[0])
            raise DataError(f"{where}: features x hold {bad} NaN or infinite value(s), first in sample {first}")
    x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    y = np.ascontiguousarray(y, dtype=y.dtype.newbyteorder("="))
    return x, y
