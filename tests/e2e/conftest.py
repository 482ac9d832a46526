"""Fixtures for the end-to-end tests: MNIST shards written by the example's own preparation script."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def coordinator_command() -> list[str]:
    script = Path(sys.executable).with_name("fl-coordinator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedlink.server"]


def kill_coordinator_during_round(config: Path, server_round: int, *more: str) -> subprocess.Popen[bytes]:
    """Start ``fl-coordinator train`` and SIGKILL it once round ``server_round``'s requests are out (it trains)."""
    process = subprocess.Popen(
        [*coordinator_command(), "train", str(config), "--log-level", "info", *more],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    marker = f"round {server_round}: training on".encode()
    seen = b""
    deadline = time.monotonic() + 300
    while marker not in seen:
        ready, _, _ = select.select([process.stderr], [], [], max(deadline - time.monotonic(), 0))
        chunk = process.stderr.read1(65536) if ready else b""  # type: ignore[attr-defined]
        assert chunk, f"coordinator ended before round {server_round}: {seen.decode()[-2000:]}"
        seen += chunk
    process.kill()
    process.wait()
    return process


def _mnist(shared_data: Path, out: Path, workers: int, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", str(workers), "--root", str(shared_data), "--out", str(out), *extra],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="session")
def mnist3(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST's first 8,000 images split IID over 3 shards, the last 2,000 as ``test.npy``."""
    return _mnist(shared_data, tmp_path_factory.mktemp("mnist3"), 3)


@pytest.fixture(scope="session")
def mnist5(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 8,000 images split IID over 5 shards."""
    return _mnist(shared_data, tmp_path_factory.mktemp("mnist5"), 5)


@pytest.fixture(scope="session")
def sms2(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SMS spam collection tokenised by the hashing tokenizer: the first 80% in two halves, the rest held out."""
    out = tmp_path_factory.mktemp("sms2")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "sms", "--workers", "2", "--root", str(shared_data), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out
