from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedlink.datasets import load_mnist
from fedlink.errors import DataError
from fedlink.server.split import (
    SplitError,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    summarize,
)

Splitter = Callable[[np.random.Generator], list[np.ndarray]]

# Ten classes of uneven size (like MNIST's), 20..29 samples each, in a scrambled order.
LABELS = np.random.default_rng(99).permutation(np.repeat(np.arange(10), np.arange(20, 30)))
N = LABELS.shape[0]

SPLITTERS: dict[str, Splitter] = {
    "iid": lambda rng: partition_iid(N, 7, rng),
    "dirichlet": lambda rng: partition_dirichlet(LABELS, 7, 0.5, rng, min_size=5),
    "classes": lambda rng: partition_classes(LABELS, 7, 2, rng),
    "quantity": lambda rng: partition_quantity(N, 7, 0.5, rng),
}


def assert_partition(parts: list[np.ndarray], n: int, n_workers: int) -> None:
    assert len(parts) == n_workers
    assert all(part.dtype == np.int64 and part.ndim == 1 and part.size >= 1 for part in parts)
    assert all((np.diff(part) > 0).all() for part in parts)  # sorted, no repeats inside a part
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


# --- properties shared by every splitter -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SPLITTERS)
@pytest.mark.parametrize("seed", range(5))
def test_is_a_partition(name: str, seed: int) -> None:
    assert_partition(SPLITTERS[name](np.random.default_rng(seed)), N, 7)


@pytest.mark.parametrize("name", SPLITTERS)
def test_same_seed_same_split_other_seed_other_split(name: str) -> None:
    first = SPLITTERS[name](np.random.default_rng(7))
    again = SPLITTERS[name](np.random.default_rng(7))
    other = SPLITTERS[name](np.random.default_rng(8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_split_error_is_data_error_and_value_error() -> None:
    assert issubclass(SplitError, DataError) and issubclass(SplitError, ValueError)


# --- iid -------------------------------------------------------------------------------------------------------


def test_iid_sizes_by_hand() -> None:
    parts = partition_iid(5, 2, np.random.default_rng(0))
    assert [part.size for part in parts] == [3, 2]
    assert_partition(parts, 5, 2)
    assert [part.size for part in partition_iid(10, 4, np.random.default_rng(0))] == [3, 3, 2, 2]
    assert sorted(part.tolist() for part in partition_iid(3, 3, np.random.default_rng(0))) == [[0], [1], [2]]


def test_iid_one_worker_gets_everything() -> None:
    assert partition_iid(4, 1, np.random.default_rng(0))[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("n", "workers"), [(3, 4), (0, 1), (5, 0), (5, -2)])
def test_iid_refuses_impossible_counts(n: int, workers: int) -> None:
    with pytest.raises(SplitError):
        partition_iid(n, workers, np.random.default_rng(0))


# --- dirichlet -------------------------------------------------------------------------------------------------


def test_dirichlet_one_worker_gets_everything() -> None:
    parts = partition_dirichlet(np.array([2, 0, 1, 0]), 1, 0.1, np.random.default_rng(0))
    assert [part.tolist() for part in parts] == [[0, 1, 2, 3]]


def test_dirichlet_respects_min_size() -> None:
    for seed in range(5):
        parts = partition_dirichlet(LABELS, 5, 0.3, np.random.default_rng(seed), min_size=20)
        assert min(part.size for part in parts) >= 20
        assert_partition(parts, N, 5)


def _label_share_spread(parts: list[np.ndarray]) -> float:
    """Mean absolute gap between each worker's label distribution and the global one."""
    overall = np.bincount(LABELS, minlength=10) / N
    return float(np.mean([np.abs(np.bincount(LABELS[p], minlength=10) / p.size - overall).sum() for p in parts]))


def test_dirichlet_alpha_controls_skew() -> None:
    rng = np.random.default_rng(3)
    skewed = _label_share_spread(partition_dirichlet(LABELS, 4, 0.05, rng))
    even = _label_share_spread(partition_dirichlet(LABELS, 4, 1000.0, rng))
    assert skewed > 0.8  # small alpha: workers see very different label mixes
    assert even < 0.2  # large alpha: close to the global mix


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(SplitError, match=r"in 25 tries; raise alpha") as info:
        partition_dirichlet(labels, 10, 0.01, np.random.default_rng(0), min_size=2, max_tries=25)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 0.0}, {"alpha": -1.0}, {"alpha": float("nan")}, {"min_size": 0}, {"min_size": 30}, {"max_tries": 0}],
)
def test_dirichlet_refuses_bad_arguments(kwargs: dict[str, float]) -> None:
    arguments: dict[str, float] = {"alpha": 0.5, "min_size": 1, **kwargs}
    with pytest.raises(SplitError):
        partition_dirichlet(LABELS, 10, rng=np.random.default_rng(0), **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("labels", [np.zeros((3, 2), dtype=int), np.array([0.0, 1.0]), ["a", "b"]])
def test_labels_must_be_1d_integers(labels: object) -> None:
    with pytest.raises(SplitError):
        partition_dirichlet(labels, 1, 1.0, np.random.default_rng(0))
    with pytest.raises(SplitError):
        partition_classes(labels, 1, 1, np.random.default_rng(0))


# --- classes (McMahan) -----------------------------------------------------------------------------------------


def test_classes_by_hand() -> None:
    labels = np.array([2, 0, 1, 0, 2, 1])
    parts = partition_classes(labels, 3, 1, np.random.default_rng(0))
    assert sorted(part.tolist() for part in parts) == [[0, 4], [1, 3], [2, 5]]


def test_classes_shards_are_single_label_and_balanced() -> None:
    # 4 labels of sizes 8, 4, 2, 2 into 8 shards: D'Hondt gives label 0 four shards, label 1 two, the rest one.
    labels = np.repeat(np.arange(4), [8, 4, 2, 2])
    parts = partition_classes(labels, 8, 1, np.random.default_rng(1))
    assert_partition(parts, 16, 8)
    assert all(np.unique(labels[part]).size == 1 for part in parts)
    assert sorted(int(labels[part[0]]) for part in parts) == [0, 0, 0, 0, 1, 1, 2, 3]
    assert {part.size for part in parts} == {2}


@pytest.mark.parametrize("seed", range(3))
def test_classes_at_most_k_labels_per_worker(seed: int) -> None:
    parts = partition_classes(LABELS, 7, 2, np.random.default_rng(seed))
    assert max(np.unique(LABELS[part]).size for part in parts) <= 2


@pytest.mark.shared_data
def test_classes_mnist_ten_workers_two_labels_each(shared_data: Path) -> None:
    _, labels = load_mnist(shared_data / "mnist")
    parts = partition_classes(labels, 10, 2, np.random.default_rng(0))
    assert_partition(parts, labels.shape[0], 10)
    held = [np.unique(labels[part]).size for part in parts]
    assert max(held) <= 2
    assert sum(held) >= 15  # most workers really hold two labels, not one
    assert all(400 <= part.size <= 1300 for part in parts)


def test_classes_refuses_too_few_shards_for_the_labels() -> None:
    with pytest.raises(SplitError, match="cannot cover all 10 labels"):
        partition_classes(LABELS, 2, 2, np.random.default_rng(0))
    with pytest.raises(SplitError):
        partition_classes(np.array([0, 1, 1]), 2, 2, np.random.default_rng(0))
    with pytest.raises(SplitError):
        partition_classes(LABELS, 2, 0, np.random.default_rng(0))


# --- quantity --------------------------------------------------------------------------------------------------


def test_quantity_by_hand() -> None:
    parts = partition_quantity(3, 3, 0.1, np.random.default_rng(0))
    assert [part.size for part in parts] == [1, 1, 1]
    assert_partition(parts, 3, 3)


def test_quantity_alpha_controls_size_skew() -> None:
    rng = np.random.default_rng(0)
    skewed = [part.size for part in partition_quantity(10_000, 10, 0.1, rng)]
    even = [part.size for part in partition_quantity(10_000, 10, 1000.0, rng)]
    assert max(skewed) > 3_000 and min(skewed) < 100
    assert max(even) - min(even) < 300


def test_quantity_refuses_bad_arguments() -> None:
    with pytest.raises(SplitError):
        partition_quantity(10, 3, 0.0, np.random.default_rng(0))
    with pytest.raises(SplitError):
        partition_quantity(2, 3, 1.0, np.random.default_rng(0))


# --- summarize -------------------------------------------------------------------------------------------------


def test_summarize_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 0])
    parts = [np.array([0, 1, 2]), np.array([3, 4])]
    assert summarize(labels, parts) == [
        {"shard": 0, "samples": 3, "labels": {0: 1, 1: 2}},
        {"shard": 1, "samples": 2, "labels": {0: 1, 2: 1}},
    ]


def test_summarize_counts_add_up() -> None:
    parts = partition_dirichlet(LABELS, 6, 0.3, np.random.default_rng(0))
    summary = summarize(LABELS, parts)
    assert sum(row["samples"] for row in summary) == N
    totals: dict[int, int] = {}
    for row in summary:
        assert sum(row["labels"].values()) == row["samples"]
        assert all(type(label) is int and type(count) is int for label, count in row["labels"].items())
        for label, count in row["labels"].items():
            totals[label] = totals.get(label, 0) + count
    assert totals == {int(v): int(c) for v, c in zip(*np.unique(LABELS, return_counts=True))}
