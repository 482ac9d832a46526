"""Fixtures shared by the whole test tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

import pytest

from fedlink.datasets import SHARED_DATA_ENV, shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (MNIST, SMS spam); skipped when absent, failed instead under CI's strict mode.

    CI sets ``FEDLINK_REQUIRE_SHARED_DATA=1`` so that a missing data folder can never turn into a green run.
    """
    root = shared_data_dir()
    if root is None or not root.is_dir():
        reason = (
            f"../shared/data not found: set ${SHARED_DATA_ENV} or place the data beside the repository "
            f"(looked at {root if root is not None else '<repo>/../shared/data'})"
        )
        if os.environ.get("FEDLINK_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def digits() -> tuple["np.ndarray", "np.ndarray"]:
    """scikit-learn's bundled digits (1,797 samples, 64 features in [0, 1]): real data that ships with a dependency."""
    from fedlink.datasets import load_digits

    return load_digits()


@pytest.fixture
def digit_shards(tmp_path: Path, digits: tuple["np.ndarray", "np.ndarray"]) -> tuple[list[Path], Path]:
    """Three IID training shards and a held-out set of the digits, as files in the shard format."""
    import numpy as np

    from fedlink.server.split import partition_iid
    from fedlink.shards import save_shard

    x, y = digits
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test, train = order[:297], order[297:]
    shards = [
        save_shard(tmp_path / f"shard-{i}.npy", x[train[p]], y[train[p]])
        for i, p in enumerate(partition_iid(len(train), 3, rng))
    ]
    return shards, save_shard(tmp_path / "test.npy", x[test], y[test])
