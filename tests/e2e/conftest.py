"""Fixtures for the end-to-end tests: MNIST shards written by the example's own preparation script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def coordinator_command() -> list[str]:
    script = Path(sys.executable).with_name("fl-coordinator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedlink.server"]


@pytest.fixture(scope="session")
def mnist3(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST's first 8,000 images split IID over 3 shards, the last 2,000 as ``test.npy``."""
    out = tmp_path_factory.mktemp("mnist3")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", "3", "--root", str(shared_data), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out
