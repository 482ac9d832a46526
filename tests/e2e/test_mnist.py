"""The foundation's acceptance job: MNIST over three real ``fl-worker`` processes, ``fl-coordinator train``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from fedlink.server.localworkers import start_workers, stop_workers

from .conftest import coordinator_command

ROOT = Path(__file__).resolve().parents[2]


def test_mnist_iid_three_workers_reaches_97_percent(mnist3: Path, tmp_path: Path) -> None:
    data = mnist3
    config = yaml.safe_load((ROOT / "examples" / "mnist-iid" / "config.yaml").read_text())
    workers = start_workers([data / f"shard-{i}.npy" for i in range(3)], extra_args=["--threads", "1"])
    try:
        config["workers"] = [w.url for w in workers]
        config["evaluation"]["data"] = str(data / "test.npy")
        for run in ("run", "again"):  # the same job twice: results arrive in any order, the bytes must not change
            config["output"] = str(tmp_path / run)
            (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(config))
            done = subprocess.run([*coordinator_command(), "train", str(tmp_path / f"{run}.yaml")], capture_output=True, timeout=900)
            assert done.returncode == 0, done.stderr.decode()[-3000:]
    finally:
        stop_workers(workers)
    assert all(w.process.returncode == 0 for w in workers)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, 11))
    assert all(r["workers"] == 3 for r in records)
    assert records[-1]["accuracy"] >= 0.97, records[-1]
    assert (tmp_path / "run" / "model.safetensors").stat().st_size > 225_034 * 4
    assert b"final accuracy" in done.stdout
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
