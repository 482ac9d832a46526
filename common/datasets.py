"""Loaders for the real data sets used by fedlink's examples, demos, benchmarks and tests.

* MNIST test set (LeCun, Cortes, Burges, "The MNIST database of handwritten digits"): the two gzipped IDX
  files ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``;
* SMS Spam Collection v.1 (Almeida, Gomez Hidalgo, Yamakami; UCI Machine Learning Repository): a
  tab-separated ``label<TAB>text`` file;
* scikit-learn's bundled 8x8 handwritten digits, which need no download at all.

The files are not shipped with fedlink; download them from those public sources, or point
``$FEDLINK_SHARED_DATA`` at a folder holding ``mnist/`` and ``sms_spam/``. Text is tokenised by hashing, not
with a vocabulary: a federation cannot build a vocabulary centrally without collecting every worker's text,
while a hash gives every worker the same token ids for the same words with nothing shared but the hash.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "MNIST_FILES",
    "SHARED_DATA_ENV",
    "SMS_SPAM_FILE",
    "hash_token",
    "load_digits",
    "load_mnist",
    "load_sms_spam",
    "shared_data_dir",
    "tokenize",
]

#: Environment variable naming the shared data folder; it wins over the folder beside the repository.
SHARED_DATA_ENV = "FEDLINK_SHARED_DATA"
#: The MNIST file names, images then labels, as published.
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
#: The SMS Spam Collection's file name, as published.
SMS_SPAM_FILE = "SMSSpamCollection"

_IDX_UBYTE = 0x08
_SMS_LABELS = {"ham": 0, "spam": 1}
_SMS_HEADER = "label\tsms"
# Words with inner apostrophes kept whole ("don't"), digits kept (phone numbers and prices mark spam).
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def shared_data_dir() -> Path | None:
    """Where the shared data sets live: ``$FEDLINK_SHARED_DATA``, else ``../shared/data`` beside the repository.

    An explicitly set variable is returned even if the folder is missing, so that a typo fails loudly in the
    loader rather than silently skipping; without it, ``None`` means the data is not available here.
    """
    configured = os.environ.get(SHARED_DATA_ENV)
    if configured:
        return Path(configured).expanduser()
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo.parent / "shared" / "data",):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def load_mnist(root: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST's IDX files from ``root`` (or ``root/mnist``): x float32 ``(N, 1, 28, 28)`` in [0, 1], y int64.

    Magic numbers, dimensions and payload sizes are checked against the headers, so a truncated download or a
    swapped file raises :class:`DataError` instead of yielding misaligned images and labels.
    """
    root = Path(root)
    folder = next((d for d in (root, root / "mnist") if (d / MNIST_FILES[0]).is_file()), root)
    images_path, labels_path = (folder / name for name in MNIST_FILES)
    for needed in (images_path, labels_path):
        if not needed.is_file():
            raise DataError(
                f"MNIST file {str(needed)!r} not found; download the MNIST test set (t10k) from "
                "http://yann.lecun.com/exdb/mnist/ or a mirror into that folder"
            )
    images = _read_idx(images_path, ndim=3)
    labels = _read_idx(labels_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"MNIST: {images.shape[0]} images in {str(images_path)!r} but {labels.shape[0]} labels")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"MNIST labels in {str(labels_path)!r} go up to {int(labels.max())}; expected 0-9")
    x = (images.astype(np.float32) / np.float32(255.0))[:, np.newaxis, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes with ``ndim`` dimensions."""
    where = f"IDX file {str(path)!r}"
    try:
        with gzip.open(path, "rb") as file:
            header = file.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise DataError(f"{where}: truncated header ({len(header)} bytes)")
            if header[:2] != b"\x00\x00" or header[2] != _IDX_UBYTE or header[3] != ndim:
                raise DataError(
                    f"{where}: bad magic number {header[:4].hex()}; expected 0000{_IDX_UBYTE:02x}{ndim:02x} "
                    f"(unsigned bytes, {ndim} dimension(s))"
                )
            shape = tuple(int(d) for d in np.frombuffer(header[4:], dtype=">u4"))
            expected = int(np.prod(shape, dtype=np.int64))
            payload = file.read(expected)
            trailing = file.read(1)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"{where}: not a readable gzip file: {type(exc).__name__}: {exc}") from exc
    if len(payload) != expected or trailing:
        raise DataError(
            f"{where}: header declares shape {shape} ({expected} bytes) but the payload has "
            f"{len(payload) + len(trailing)}{'+' if trailing else ''} bytes"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words (letters and digits, inner apostrophes kept)."""
    return _TOKEN_RE.findall(text.lower())


def hash_token(token: str, vocab_size: int = 20000) -> int:
    """Map a token to an id in ``[1, vocab_size)``, the same on every machine and Python process.

    ``hash()`` is salted per process, so it would give each worker different ids; BLAKE2b of the UTF-8 bytes
    is stable. Id 0 is left for padding. Changing this function changes every trained text model's meaning.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (id 0 is padding), got {vocab_size}")
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (vocab_size - 1)


def load_sms_spam(
    path: str | os.PathLike[str], *, seq_len: int = 40, vocab_size: int = 20000
) -> tuple[np.ndarray, np.ndarray]:
    """Read the SMS Spam Collection as hashed token ids: x int64 ``(N, seq_len)``, y int64 (ham 0, spam 1).

    ``path`` is the file, or a folder holding it (directly or under ``sms_spam/``). Each message keeps its
    first ``seq_len`` tokens and is right-padded with 0, matching :func:`fedlink.models.gru_classifier`.
    Messages stay in file order, since the reference test split is the last 20% of the file.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (id 0 is padding), got {vocab_size}")
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / SMS_SPAM_FILE, path / "sms_spam" / SMS_SPAM_FILE) if p.is_file()), path)
    where = f"SMS spam file {str(path)!r}"
    if not path.is_file():
        raise DataError(
            f"{where} not found; download the SMS Spam Collection v.1 from the UCI Machine Learning Repository"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot read as UTF-8 text: {exc}") from exc
    # Split on newlines only: str.splitlines would also split inside messages on form feeds and Unicode breaks.
    lines = text.split("\n")
    start = 1 if lines and lines[0].rstrip("\r").lower() == _SMS_HEADER else 0
    ids: list[list[int]] = []
    labels: list[int] = []
    for number, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, tab, message = line.partition("\t")
        if not tab or label not in _SMS_LABELS:
            raise DataError(f"{where}, line {number}: expected 'ham' or 'spam', a tab, then the message")
        labels.append(_SMS_LABELS[label])
        ids.append([hash_token(token, vocab_size) for token in tokenize(message)[:seq_len]])
    if not labels:
        raise DataError(f"{where}: no messages")
    x = np.zeros((len(ids), seq_len), dtype=np.int64)
    for row, tokens in enumerate(ids):
        x[row, : len(tokens)] = tokens
    return x, np.asarray(labels, dtype=np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 samples): x float32 ``(N, 64)`` in [0, 1], y int64.

    They ship inside scikit-learn, so demos and tests can run with no data download at all.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits  # type: ignore[import-untyped]
    except ImportError as exc:
        raise DataError(
            "the digits data set comes with scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install 'fedlink[demo]')"
        ) from exc
    bunch = sklearn_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)  # pixel intensities run 0..16
    return np.ascontiguousarray(x), np.asarray(bunch.target, dtype=np.int64)
