"""SCAFFOLD with real worker processes: a coordinator SIGKILLed mid-round and resumed ends with the very model of an
uninterrupted run, although every worker keeps control variates between rounds (and has already updated its own
for the round that is run again)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlink.server.localworkers import start_workers, stop_workers

from .conftest import ROOT, coordinator_command, kill_coordinator_during_round


def _digits(out: Path) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "digits", "--workers", "3", "--dirichlet", "0.3",
         "--out", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    return out


def _config(path: Path, urls: list[str], data: Path, out: Path, rounds: int) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "digits" / "config.yaml").read_text())
    config.update(workers=urls, rounds=rounds, output=str(out), strategy={"name": "scaffold"})
    config["training"]["optimizer"] = {"name": "sgd", "lr": 0.05, "momentum": 0.0}
    config["evaluation"]["data"] = str(data / "test.npy")
    path.write_text(yaml.safe_dump(config))
    return path


def _records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_scaffold_resume_after_sigkill_is_bit_identical(tmp_path: Path) -> None:
    data = _digits(tmp_path / "data")
    # --slowdown: a digits round takes a fraction of a second; this keeps round 3 running when the kill comes.
    workers = start_workers([data / f"shard-{i}.npy" for i in range(3)], extra_args=["--threads", "1", "--slowdown", "6"])
    try:
        urls = [w.url for w in workers]
        interrupted = _config(tmp_path / "interrupted.yaml", urls, data, tmp_path / "interrupted", rounds=4)
        killed = kill_coordinator_during_round(interrupted, 3)
        assert killed.returncode == -9
        assert [r["round"] for r in _records(tmp_path / "interrupted")] in ([1], [1, 2])
        resumed = subprocess.run([*coordinator_command(), "train", str(interrupted), "--resume"], capture_output=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]

        clean = _config(tmp_path / "clean.yaml", urls, data, tmp_path / "clean", rounds=4)
        straight = subprocess.run([*coordinator_command(), "train", str(clean)], capture_output=True, timeout=600)
        assert straight.returncode == 0, straight.stderr.decode()[-3000:]
    finally:
        stop_workers(workers)
    resumed_records, clean_records = _records(tmp_path / "interrupted"), _records(tmp_path / "clean")
    assert [r["round"] for r in resumed_records] == [1, 2, 3, 4], "each round exactly once"
    assert (tmp_path / "interrupted" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert [r["accuracy"] for r in resumed_records] == [r["accuracy"] for r in clean_records]
    # The control variate is really in play (not zero after round 1) and nobody lost theirs.
    assert all(r["scaffold_c_norm"] > 0 and r["scaffold_lost_state"] == 0 for r in clean_records)  # type: ignore[operator]
    assert [r["scaffold_c_norm"] for r in resumed_records] == [r["scaffold_c_norm"] for r in clean_records]


@pytest.mark.slow
@pytest.mark.shared_data
def test_scaffold_resume_on_mnist(mnist3: Path, tmp_path: Path) -> None:
    """The same on the MNIST job of test_resume.py (the CNN, 6 rounds)."""
    workers = start_workers([mnist3 / f"shard-{i}.npy" for i in range(3)], extra_args=["--threads", "1"])
    try:
        urls = [w.url for w in workers]
        paths = {}
        for name in ("interrupted", "clean"):
            config = yaml.safe_load((ROOT / "examples" / "mnist-iid" / "config.yaml").read_text())
            config.update(workers=urls, rounds=6, output=str(tmp_path / name), strategy={"name": "scaffold"})
            config["training"]["optimizer"] = {"name": "sgd", "lr": 0.05, "momentum": 0.0}
            config["evaluation"]["data"] = str(mnist3 / "test.npy")
            paths[name] = tmp_path / f"{name}.yaml"
            paths[name].write_text(yaml.safe_dump(config))
        assert kill_coordinator_during_round(paths["interrupted"], 3).returncode == -9
        resumed = subprocess.run([*coordinator_command(), "train", str(paths["interrupted"]), "--resume"], capture_output=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
        straight = subprocess.run([*coordinator_command(), "train", str(paths["clean"])], capture_output=True, timeout=900)
        assert straight.returncode == 0, straight.stderr.decode()[-3000:]
    finally:
        stop_workers(workers)
    assert [r["round"] for r in _records(tmp_path / "interrupted")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "interrupted" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()
