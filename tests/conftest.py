"""Fixtures shared by the whole test tree."""

from __future__ import annotations

import os
from pathlib import Path

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
