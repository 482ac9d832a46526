from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlink.errors import DataError
from fedlink.shards import Shard, load_shard, save_shard


def _arrays(n: int = 12, shape: tuple[int, ...] = (1, 4, 4)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, *shape), dtype=np.float32), (np.arange(n) % 3).astype(np.int64)


def _structured(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    records = np.empty(len(y), dtype=[("x", x.dtype, x.shape[1:]), ("y", y.dtype)])
    records["x"] = x
    records["y"] = y
    return records


def _refused(path: Path, *words: str) -> DataError:
    with pytest.raises(DataError) as info:
        load_shard(path)
    message = str(info.value)
    assert path.name in message, message
    for word in words:
        assert word in message.lower(), message
    return info.value


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((1, 4, 4), np.float32), ((), np.float64), ((1,), np.int16), ((3, 2), np.uint8), ((5,), np.bool_)],
)
def test_round_trip(tmp_path: Path, suffix: str, shape: tuple[int, ...], dtype: type) -> None:
    x, y = _arrays(7, shape)
    x = x.astype(dtype)
    path = save_shard(tmp_path / f"shard{suffix}", x, y)
    shard = load_shard(path)
    assert shard.path == path
    np.testing.assert_array_equal(shard.x, x)
    np.testing.assert_array_equal(shard.y, y)
    assert shard.num_samples == 7
    assert shard.sample_shape == shape
    assert shard.x_dtype == np.dtype(dtype).name
    assert shard.num_classes_seen == 3
    assert shard.max_label == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_npy_is_a_structured_array(tmp_path: Path) -> None:
    x, y = _arrays()
    save_shard(tmp_path / "s.npy", x, y)
    raw = np.load(tmp_path / "s.npy", allow_pickle=False)
    assert raw.dtype.names == ("x", "y")
    assert raw.shape == (12,)


def test_loads_hand_written_npz_and_structured_npy(tmp_path: Path) -> None:
    x, y = _arrays(5, (2,))
    np.savez_compressed(tmp_path / "a.npz", x=x, y=y.astype(np.uint8), extra=np.zeros(1))
    np.save(tmp_path / "b.npy", _structured(x, y.astype(np.int32)))
    for name in ("a.npz", "b.npy"):
        shard = load_shard(tmp_path / name)
        np.testing.assert_array_equal(shard.x, x)
        np.testing.assert_array_equal(shard.y, y)


def test_to_tensors(tmp_path: Path) -> None:
    x, y = _arrays(4)
    shard = load_shard(save_shard(tmp_path / "s.npy", x, y.astype(np.int32)))
    tx, ty = shard.to_tensors()
    assert tx.dtype == torch.float32 and tx.shape == (4, 1, 4, 4)
    assert ty.dtype == torch.int64
    assert ty.tolist() == y.tolist()
    tx += 1  # fresh tensors: changing them leaves the shard alone
    np.testing.assert_array_equal(shard.x, x)


def test_to_tensors_widens_unsigned_features(tmp_path: Path) -> None:
    shard = load_shard(save_shard(tmp_path / "s.npz", np.array([[1, 2], [3, 65535]], np.uint16), [0, 1]))
    tx, _ = shard.to_tensors()
    assert tx.dtype == torch.int64
    assert tx.max().item() == 65535


def test_big_endian_arrays_load_native(tmp_path: Path) -> None:
    x, y = _arrays(3, (2,))
    np.savez(tmp_path / "be.npz", x=x.astype(">f4"), y=y.astype(">i8"))
    shard = load_shard(tmp_path / "be.npz")
    assert shard.x.dtype.isnative and shard.y.dtype.isnative
    tx, ty = shard.to_tensors()  # torch refuses non-native byte order
    assert tx.shape == (3, 2) and ty.tolist() == [0, 1, 2]


def test_shard_is_read_only(tmp_path: Path) -> None:
    shard = load_shard(save_shard(tmp_path / "s.npy", *_arrays()))
    with pytest.raises(ValueError):
        shard.x[0] = 0
    with pytest.raises(AttributeError):
        shard.x = np.zeros(1)  # type: ignore[misc]
    assert "num_samples=12" in repr(shard)


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.npy", "no such file")


def test_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.npy").mkdir()
    _refused(tmp_path / "dir.npy", "not a regular file")


@pytest.mark.parametrize("name", ["data.csv", "data.pkl", "data", "data.npy.gz"])
def test_unsupported_suffix(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"1,2,3\n")
    _refused(tmp_path / name, "unsupported suffix")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_real_pickle_is_refused_and_never_unpickled(tmp_path: Path, suffix: str) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(tmp_path / "pwned"),))

    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"x": Boom(), "y": [1]}))
    _refused(path, "not a numpy")
    assert not (tmp_path / "pwned").exists()


def test_object_dtype_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _refused(tmp_path / "obj.npy", "object")
    np.savez(tmp_path / "obj.npz", x=np.array([[1.0]]), y=np.array([1], dtype=object))
    _refused(tmp_path / "obj.npz", "object")


def test_plain_array_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "plain.npy", np.zeros((10, 3), dtype=np.float32))
    _refused(tmp_path / "plain.npy", "structured array", "'x'")


def test_missing_fields(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=[("x", "f4", (2,)), ("label", "i8")]))
    _refused(tmp_path / "f.npy", "['y']")
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 2)))
    _refused(tmp_path / "f.npz", "['y']")


def test_structured_array_must_be_one_dimensional(tmp_path: Path) -> None:
    x, y = _arrays(4, (2,))
    np.save(tmp_path / "2d.npy", _structured(x, y).reshape(2, 2))
    _refused(tmp_path / "2d.npy", "1-d")


def test_empty_shard(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", np.empty(0, dtype=[("x", "f4", (2,)), ("y", "i8")]))
    _refused(tmp_path / "e.npy", "empty")


def test_length_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", x=np.zeros((5, 2)), y=np.zeros(4, dtype=np.int64))
    _refused(tmp_path / "m.npz", "5 samples", "4 labels")


def test_labels_must_be_one_dimensional(tmp_path: Path) -> None:
    np.savez(tmp_path / "y2.npz", x=np.zeros((4, 2)), y=np.zeros((4, 1), dtype=np.int64))
    _refused(tmp_path / "y2.npz", "1-d")


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, 1.0]), np.array([0.5, 1, 1]), np.array([True, False, True])])
def test_non_integer_labels(tmp_path: Path, labels: np.ndarray) -> None:
    np.savez(tmp_path / "l.npz", x=np.zeros((3, 2)), y=labels)
    _refused(tmp_path / "l.npz", "integer", str(labels.dtype))


def test_negative_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "n.npz", x=np.zeros((4, 2)), y=np.array([0, 1, -1, -3]))
    _refused(tmp_path / "n.npz", "2 negative", "sample 2")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_non_finite_features(tmp_path: Path, bad: float, suffix: str) -> None:
    x, y = _arrays(6, (2, 3))
    x[4, 1, 2] = bad
    path = tmp_path / f"nan{suffix}"
    if suffix == ".npy":
        np.save(path, _structured(x, y))
    else:
        np.savez(path, x=x, y=y)
    _refused(path, "nan or infinite", "sample 4")


@pytest.mark.parametrize("x", [np.array([["a"], ["b"]]), np.array([[1 + 2j], [3j]])])
def test_unsupported_feature_dtypes(tmp_path: Path, x: np.ndarray) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    _refused(tmp_path / "d.npz", "unsupported dtype")


def test_npz_content_under_npy_name_and_back(tmp_path: Path) -> None:
    x, y = _arrays(3, (2,))
    with (tmp_path / "zip.npy").open("wb") as file:
        np.savez(file, x=x, y=y)
    _refused(tmp_path / "zip.npy", "rename it to .npz")
    with (tmp_path / "single.npz").open("wb") as file:
        np.save(file, _structured(x, y))
    _refused(tmp_path / "single.npz", "rename it to .npy")


def _good_npy_bytes(tmp_path: Path) -> bytes:
    save_shard(tmp_path / "good.npy", *_arrays(8, (3,)))
    return (tmp_path / "good.npy").read_bytes()


@pytest.mark.parametrize("cut", [3, 20, 100, -1, -40])
def test_truncated_npy(tmp_path: Path, cut: int) -> None:
    good = _good_npy_bytes(tmp_path)
    (tmp_path / "t.npy").write_bytes(good[:cut])
    _refused(tmp_path / "t.npy")


def test_header_claiming_a_huge_shape_fails_without_allocating(tmp_path: Path) -> None:
    good = _good_npy_bytes(tmp_path)
    header_end = good.index(b"\n") + 1
    header = good[:header_end].replace(b"(8,)", b"(10000000000000,)")
    header = header[:-1].rstrip(b" ")
    header += b" " * (header_end - 1 - len(header)) + b"\n"  # keep the data where it was
    (tmp_path / "huge.npy").write_bytes(header + good[header_end:])
    _refused(tmp_path / "huge.npy")


def test_random_bytes_and_empty_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for suffix in (".npy", ".npz"):
        (tmp_path / f"r{suffix}").write_bytes(rng.bytes(300))
        _refused(tmp_path / f"r{suffix}")
        (tmp_path / f"e{suffix}").write_bytes(b"")
        _refused(tmp_path / f"e{suffix}")


def test_corrupt_zip_member(tmp_path: Path) -> None:
    x, y = _arrays(8, (3,))
    np.savez(tmp_path / "c.npz", x=x, y=y)
    data = bytearray((tmp_path / "c.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "c.npz") as archive:
        offset = archive.getinfo("x.npy").header_offset + 100
    data[offset : offset + 20] = bytes(20)
    (tmp_path / "c.npz").write_bytes(bytes(data))
    _refused(tmp_path / "c.npz")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_fuzzed_files_raise_only_data_error(tmp_path: Path, suffix: str) -> None:
    x, y = _arrays(8, (3,))
    good = save_shard(tmp_path / f"good{suffix}", x, y).read_bytes()
    rng = np.random.default_rng(2)
    path = tmp_path / f"fuzz{suffix}"
    for _ in range(150):
        data = bytearray(good)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[position] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(0, len(data)))]
        path.write_bytes(bytes(data))
        try:
            shard = load_shard(path)
        except DataError:
            continue
        assert isinstance(shard, Shard)  # survived corruption in a value: still a valid shard
        assert shard.num_samples >= 1


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        save_shard(tmp_path / "bad.npy", np.array([[np.nan]]), np.array([0]))
    with pytest.raises(DataError):
        save_shard(tmp_path / "bad.npy", np.zeros((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(DataError):
        save_shard(tmp_path / "bad.txt", np.zeros((2, 2)), np.array([0, 1]))
    assert not list(tmp_path.iterdir())


def test_save_replaces_an_existing_shard(tmp_path: Path) -> None:
    path = tmp_path / "s.npy"
    save_shard(path, *_arrays(5))
    save_shard(path, *_arrays(9))
    assert load_shard(path).num_samples == 9
