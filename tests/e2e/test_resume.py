"""A coordinator SIGKILLed mid-round and resumed ends with the very model of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from fedlink.server.localworkers import start_workers, stop_workers

from .conftest import ROOT, coordinator_command, kill_coordinator_during_round


def _config(path: Path, urls: list[str], data: Path, out: Path) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "mnist-iid" / "config.yaml").read_text())
    config.update(workers=urls, rounds=6, output=str(out))
    config["evaluation"]["data"] = str(data / "test.npy")
    path.write_text(yaml.safe_dump(config))
    return path


def test_resume_after_sigkill_is_bit_identical(mnist3: Path, tmp_path: Path) -> None:
    workers = start_workers([mnist3 / f"shard-{i}.npy" for i in range(3)], extra_args=["--threads", "1"])
    try:
        urls = [w.url for w in workers]
        interrupted = _config(tmp_path / "interrupted.yaml", urls, mnist3, tmp_path / "interrupted")
        killed = kill_coordinator_during_round(interrupted, 3)
        assert killed.returncode == -9
        lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
        # Round 2 is evaluated and recorded while round 3 trains, so the kill may land before its record.
        assert [json.loads(l)["round"] for l in lines] in ([1], [1, 2]), lines
        assert not (tmp_path / "interrupted" / "model.safetensors").exists()
        resumed = subprocess.run([*coordinator_command(), "train", str(interrupted), "--resume"], capture_output=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]

        clean = _config(tmp_path / "clean.yaml", urls, mnist3, tmp_path / "clean")
        straight = subprocess.run([*coordinator_command(), "train", str(clean)], capture_output=True, timeout=600)
        assert straight.returncode == 0, straight.stderr.decode()[-3000:]
    finally:
        stop_workers(workers)
    rounds = [json.loads(l)["round"] for l in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5, 6], "each round exactly once"
    resumed_model = (tmp_path / "interrupted" / "model.safetensors").read_bytes()
    clean_model = (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert resumed_model == clean_model, "a resumed run ends with the same bytes as an uninterrupted one"
    accuracies = [json.loads(l)["accuracy"] for l in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    resumed_acc = [json.loads(l)["accuracy"] for l in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert accuracies == resumed_acc
