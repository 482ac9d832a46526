"""Partition a data set's indices across workers, to simulate a federation's non-IID data on one machine.

Every function returns ``list[np.ndarray]``: one sorted int64 index array per worker, together a partition of
``range(N)`` (every index exactly once, no worker empty). They are pure and draw all randomness from the
``np.random.Generator`` passed in, so a seed reproduces a split exactly.

* :func:`partition_iid`: a uniform random split into near-equal parts;
* :func:`partition_dirichlet`: label skew with per-class Dirichlet proportions (Hsu, Qi, Brown, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019);
* :func:`partition_classes`: the pathological split of McMahan et al., "Communication-Efficient Learning of
  Deep Networks from Decentralized Data" (AISTATS 2017): each worker holds a few label-sorted shards;
* :func:`partition_quantity`: quantity skew, Dirichlet-distributed sizes with IID content.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlink.errors import DataError

__all__ = [
    "SplitError",
    "partition_classes",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "summarize",
]


class SplitError(DataError, ValueError):
    """A split cannot be made as asked; also a ``ValueError``, since the arguments are what is wrong."""


def _check_counts(n_samples: int, n_workers: int, min_size: int = 1) -> None:
    if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
        raise SplitError(f"n_workers must be a positive integer, got {n_workers!r}")
    if n_samples < n_workers * min_size:
        raise SplitError(
            f"cannot give {n_workers} workers at least {min_size} sample(s) each from only {n_samples} samples"
        )


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float, np.floating)) and np.isfinite(alpha) and alpha > 0):
        raise SplitError(f"alpha must be a positive finite number, got {alpha!r}")


def _check_labels(labels: Any) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise SplitError(f"labels must be a 1-D integer array, got shape {array.shape} and dtype {array.dtype}")
    return array


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    # Ascending order keeps each worker's data in the source's order, which makes shards easy to inspect.
    return [np.sort(part).astype(np.int64, copy=False) for part in parts]


def partition_iid(n_samples: int, n_workers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(n_samples)`` and cut it into ``n_workers`` parts whose sizes differ by at most one."""
    _check_counts(n_samples, n_workers)
    return _finish(np.array_split(rng.permutation(n_samples), n_workers))


def partition_dirichlet(
    labels: Any,
    n_workers: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    *,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Give each worker a share of every class drawn from ``Dirichlet(alpha)``: small ``alpha``, strong skew.

    Each class's samples are shuffled and cut by proportions drawn independently per class. A draw leaving a
    worker below ``min_size`` samples is redrawn, up to ``max_tries`` times, after which :class:`SplitError`
    says what to relax; the bound keeps an impossible request from spinning forever.
    """
    y = _check_labels(labels)
    _check_alpha(alpha)
    if isinstance(min_size, bool) or min_size < 1:
        raise SplitError(f"min_size must be at least 1 so that no worker is empty, got {min_size!r}")
    if max_tries < 1:
        raise SplitError(f"max_tries must be at least 1, got {max_tries!r}")
    _check_counts(y.shape[0], n_workers, min_size)
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(n_workers, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * shuffled.shape[0]).astype(np.int64)
            for worker, piece in enumerate(np.split(shuffled, cuts)):
                parts[worker].append(piece)
        merged = [np.concatenate(pieces) for pieces in parts]
        if min(part.shape[0] for part in merged) >= min_size:
            return _finish(merged)
    raise SplitError(
        f"no Dirichlet(alpha={alpha}) split of {y.shape[0]} samples gave all {n_workers} workers at least "
        f"{min_size} sample(s) in {max_tries} tries; raise alpha, lower min_size or use fewer workers"
    )


def partition_classes(
    labels: Any, n_workers: int, classes_per_worker: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan's pathological split: each worker gets ``classes_per_worker`` single-label shards.

    The paper sorts by label and cuts equal shards, which lets a shard straddle two labels where class sizes
    do not line up; here each label's samples are cut into their own shards instead (``n_workers *
    classes_per_worker`` in all, allotted to labels in proportion to their size, D'Hondt style), so a worker
    is guaranteed to hold at most ``classes_per_worker`` labels. That needs at least one shard per label.
    """
    y = _check_labels(labels)
    if isinstance(classes_per_worker, bool) or classes_per_worker < 1:
        raise SplitError(f"classes_per_worker must be a positive integer, got {classes_per_worker!r}")
    _check_counts(y.shape[0], n_workers)
    n_shards = n_workers * classes_per_worker
    values, counts = np.unique(y, return_counts=True)
    if n_shards < values.size:
        raise SplitError(
            f"{n_workers} workers x {classes_per_worker} classes each = {n_shards} shards cannot cover all "
            f"{values.size} labels; raise n_workers or classes_per_worker"
        )
    if n_shards > y.shape[0]:
        raise SplitError(f"cannot cut {y.shape[0]} samples into {n_shards} non-empty shards")
    shards_per_label = np.ones(values.size, dtype=np.int64)
    for _ in range(n_shards - values.size):
        # Give the next shard to the label whose shards are currently largest, keeping shard sizes even.
        shards_per_label[np.argmax(counts / shards_per_label)] += 1
    shards: list[np.ndarray] = []
    for value, pieces in zip(values, shards_per_label):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(y == value)), int(pieces)))
    assignment = rng.permutation(n_shards).reshape(n_workers, classes_per_worker)
    return _finish([np.concatenate([shards[s] for s in row]) for row in assignment])


def partition_quantity(
    n_samples: int, n_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split IID content into parts whose sizes follow ``Dirichlet(alpha)``; every worker gets at least one.

    One sample per worker is set aside first and the rest drawn multinomially, so the sizes always sum to
    ``n_samples`` and no retry is ever needed.
    """
    _check_counts(n_samples, n_workers)
    _check_alpha(alpha)
    proportions = rng.dirichlet(np.full(n_workers, float(alpha)))
    sizes = 1 + rng.multinomial(n_samples - n_workers, proportions)
    return _finish(np.split(rng.permutation(n_samples), np.cumsum(sizes)[:-1]))


def summarize(labels: Any, parts: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per part: ``{"shard": i, "samples": n, "labels": {label: count}}``, for logs and split reports."""
    y = _check_labels(labels)
    summary: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        values, counts = np.unique(y[np.asarray(part, dtype=np.int64)], return_counts=True)
        summary.append(
            {
                "shard": index,
                "samples": int(np.asarray(part).shape[0]),
                "labels": {int(v): int(c) for v, c in zip(values, counts)},
            }
        )
    return summary
