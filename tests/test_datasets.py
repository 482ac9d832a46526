from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlink import datasets
from fedlink.datasets import hash_token, load_digits, load_mnist, load_sms_spam, shared_data_dir, tokenize
from fedlink.errors import DataError

MNIST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_idx(path: Path, magic: bytes, dims: tuple[int, ...], payload: bytes) -> None:
    with gzip.open(path, "wb") as file:
        file.write(magic + struct.pack(f">{len(dims)}I", *dims) + payload)


def _tiny_mnist(root: Path, n: int = 3, *, image_magic: bytes = b"\x00\x00\x08\x03", extra: bytes = b"") -> None:
    pixels = bytes(i % 256 for i in range(n * 28 * 28))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", image_magic, (n, 28, 28), pixels + extra)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01", (n,), bytes(range(n)))


# --- shared_data_dir -------------------------------------------------------------------------------------------


def test_shared_data_dir_prefers_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLINK_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("FEDLINK_SHARED_DATA", str(tmp_path / "typo"))
    assert shared_data_dir() == tmp_path / "typo"  # returned as set, so the loader fails loudly


def test_shared_data_dir_defaults_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLINK_SHARED_DATA", raising=False)
    expected = Path(datasets.__file__).resolve().parent.parent.parent / "shared" / "data"
    found = shared_data_dir()
    if expected.is_dir():
        assert found == expected.resolve()
    else:
        assert found is None


# --- MNIST -----------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_mnist_full_test_set(shared_data: Path) -> None:
    x, y = load_mnist(shared_data / "mnist")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert np.bincount(y).tolist() == MNIST_COUNTS
    assert x.flags.c_contiguous


@pytest.mark.shared_data
def test_mnist_accepts_the_parent_folder(shared_data: Path) -> None:
    _, y = load_mnist(shared_data)
    assert y.shape == (10_000,)


def test_mnist_tiny_file_values(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    x, y = load_mnist(tmp_path)
    assert y.tolist() == [0, 1, 2]
    assert x[0, 0, 0, :3].tolist() == pytest.approx([0.0, 1 / 255, 2 / 255])


def test_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_mnist_bad_magic(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path, image_magic=b"\x00\x00\x08\x01")
    with pytest.raises(DataError, match="bad magic"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 1000])
def test_mnist_payload_longer_than_header(tmp_path: Path, extra: bytes) -> None:
    _tiny_mnist(tmp_path, extra=extra)
    with pytest.raises(DataError, match="header declares"):
        load_mnist(tmp_path)


def test_mnist_truncated_payload(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x03", (3, 28, 28), b"\x00" * 100)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01", (3,), b"\x00\x01\x02")
    with pytest.raises(DataError, match="header declares"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01", (2,), b"\x00\x01")
    with pytest.raises(DataError, match="3 images"):
        load_mnist(tmp_path)


def test_mnist_not_gzip(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        load_mnist(tmp_path)


def test_mnist_truncated_gzip(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-30])
    with pytest.raises(DataError):
        load_mnist(tmp_path)


# --- SMS spam --------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_sms_spam_full_file(shared_data: Path) -> None:
    x, y = load_sms_spam(shared_data / "sms_spam" / "SMSSpamCollection")
    assert x.shape == (5_574, 40) and x.dtype == np.int64
    assert y.shape == (5_574,) and y.dtype == np.int64
    assert int(y.sum()) == 747
    assert int(x.min()) == 0 and int(x.max()) < 20_000
    assert int((x[:, 0] == 0).sum()) == 2  # only ":) " and ":-) :-)" have no word at all
    # The first message starts "Go until jurong point"; ids are hashed, not looked up.
    assert x[0, :4].tolist() == [hash_token(w) for w in ("go", "until", "jurong", "point")]
    assert y[:3].tolist() == [0, 0, 1]


@pytest.mark.shared_data
def test_sms_spam_accepts_folders_and_sizes(shared_data: Path) -> None:
    x, y = load_sms_spam(shared_data, seq_len=8, vocab_size=50)
    assert x.shape == (5_574, 8) and int(y.sum()) == 747
    assert int(x.max()) < 50


def test_sms_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "sms.tsv"
    path.write_text("Label\tSMS\nham\tHi there, Bob!\nspam\tWIN £1000 now: call 0800\tnow\n\nham\ta b c d e f\n")
    x, y = load_sms_spam(path, seq_len=4, vocab_size=1000)
    assert y.tolist() == [0, 1, 0]
    assert x[0].tolist() == [hash_token(t, 1000) for t in ("hi", "there", "bob")] + [0]
    assert x[1].tolist() == [hash_token(t, 1000) for t in ("win", "1000", "now", "call")]
    assert x[2].tolist() == [hash_token(t, 1000) for t in "abcd"]  # truncation keeps the first tokens


def test_sms_without_header(tmp_path: Path) -> None:
    path = tmp_path / "SMSSpamCollection"
    path.write_text("spam\tfree\r\nham\tok\r\n")
    _, y = load_sms_spam(tmp_path)
    assert y.tolist() == [1, 0]


@pytest.mark.parametrize("line", ["eggs\thello", "ham hello", "HAM\thello"])
def test_sms_bad_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "sms.tsv"
    path.write_text(f"Label\tSMS\nham\tok\n{line}\n")
    with pytest.raises(DataError, match="line 3"):
        load_sms_spam(path)


def test_sms_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_sms_spam(tmp_path / "nope")
    (tmp_path / "empty").write_text("Label\tSMS\n")
    with pytest.raises(DataError, match="no messages"):
        load_sms_spam(tmp_path / "empty")
    (tmp_path / "latin1").write_bytes("ham\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_sms_spam(tmp_path / "latin1")


def test_tokenize() -> None:
    assert tokenize("Don't WIN £1,000 now!! call_me") == ["don't", "win", "1", "000", "now", "call", "me"]
    assert tokenize("...") == []


def test_hash_token_is_stable_and_in_range() -> None:
    # Pinned values: changing the hash silently changes every trained text model's token ids.
    assert hash_token("free") == 2710
    assert hash_token("free", 100) == 90
    assert hash_token("") == 17688
    ids = {hash_token(f"w{i}", 50) for i in range(2000)}
    assert ids == set(range(1, 50))
    with pytest.raises(ValueError):
        hash_token("x", 1)


# --- digits ----------------------------------------------------------------------------------------------------


def test_digits() -> None:
    x, y = load_digits()
    assert x.shape == (1_797, 64) and x.dtype == np.float32
    assert y.shape == (1_797,) and y.dtype == np.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(set(y.tolist())) == list(range(10))


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_digits()
