"""Differential privacy end to end: real fl-worker processes, the real fl-coordinator CLI.

- local DP: each worker trains with DP-SGD and reports its epsilon; ``fl-worker --max-epsilon`` refuses the round
  that would pass it (``policy_refused``), and the coordinator records the largest worker epsilon;
- ``fl-worker --require-dp`` refuses a round without DP and takes one with it;
- central DP: a run SIGKILLed mid-run and resumed ends with the very bytes and epsilon series of one that ran
  straight (both with the run's one secret, which lives in the checkpoint folder only).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedlink.privacy import compute_epsilon
from fedlink.server.localworkers import LocalWorker, spawn_worker, start_workers, stop_workers, wait_ready
from fedlink.shards import load_shard

from .conftest import coordinator_command, kill_coordinator_during_round

MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 784, "hidden": 32}}


def _config(path: Path, urls: list[str], data: Path, out: Path, **extra: Any) -> Path:
    config: dict[str, Any] = {
        "name": "privacy-e2e", "seed": 1, "model": MLP, "workers": urls, "rounds": 2,
        "sampling": {"min_workers": 1},
        "training": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1}, "update": "delta"},
        "timeouts": {"round": 300, "round_retries": 0},
        "evaluation": {"data": str(data / "test.npy")},
        "output": str(out),
    }
    config.update(extra)
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, *more: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*coordinator_command(), "train", str(config), *more], capture_output=True, timeout=600)


def _two_workers(data: Path, first_args: list[str]) -> list[LocalWorker]:
    """worker-0 with ``first_args``, worker-1 without, on shards 0 and 1."""
    spawned = [
        spawn_worker(data / "shard-0.npy", worker_id="worker-0", extra_args=["--threads", "1", *first_args]),
        spawn_worker(data / "shard-1.npy", worker_id="worker-1", extra_args=["--threads", "1"]),
    ]
    try:
        return [wait_ready(one) for one in spawned]
    except BaseException:
        for one in spawned:
            if one.process.poll() is None:
                one.process.kill()
                one.process.wait()
        raise


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_dp_worker_refuses_rounds_past_its_max_epsilon(mnist3: Path, tmp_path: Path) -> None:
    n = load_shard(mnist3 / "shard-0.npy").num_samples
    q, steps, z = 64 / n, math.ceil(n / 64), 1.5
    one, two = (compute_epsilon([(z, q, steps * r)], 1e-5) for r in (1, 2))
    budget = (one + two) / 2  # worker-0 takes round 1 and refuses round 2
    workers = _two_workers(mnist3, ["--max-epsilon", str(budget)])
    try:
        config = _config(
            tmp_path / "local.yaml", [w.url for w in workers], mnist3, tmp_path / "run",
            privacy={"mode": "local", "clip_norm": 1.0, "noise_multiplier": z},
        )
        done = _train(config)
    finally:
        stop_workers(workers)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"epsilon" in done.stdout, done.stdout
    trained = [w for w in _lines(tmp_path / "run" / "workers.jsonl") if w["stage"] == "train"]
    by = {(w["round"], w["worker"]): w for w in trained}
    assert by[(1, "worker-0")]["status"] == "ok"
    assert by[(1, "worker-0")]["metrics"]["epsilon"] == pytest.approx(one, rel=1e-9)
    refused = by[(2, "worker-0")]
    assert refused["status"] == "dropped" and "--max-epsilon" in refused["reason"] and "round 2" in refused["reason"]
    assert by[(2, "worker-1")]["status"] == "ok"
    records = _lines(tmp_path / "run" / "metrics.jsonl")
    # The largest epsilon any worker has spent: worker-1's, whose shard may differ in size by one.
    assert [r["epsilon"] for r in records] == [
        max(by[(1, w)]["metrics"]["epsilon"] for w in ("worker-0", "worker-1")),
        by[(2, "worker-1")]["metrics"]["epsilon"],
    ]
    assert all(r["delta"] == 1e-5 for r in records)


def test_require_dp_refuses_a_round_without_dp_and_takes_one_with_it(mnist3: Path, tmp_path: Path) -> None:
    workers = _two_workers(mnist3, ["--require-dp"])
    try:
        urls = [w.url for w in workers]
        plain = _train(_config(tmp_path / "plain.yaml", urls, mnist3, tmp_path / "plain", rounds=1))
        private = _train(_config(
            tmp_path / "dp.yaml", urls, mnist3, tmp_path / "dp", rounds=1,
            privacy={"mode": "central", "clip_norm": 1.0, "noise_multiplier": 0.5},
        ))
    finally:
        stop_workers(workers)
    assert plain.returncode == 0, plain.stderr.decode()[-3000:]
    assert private.returncode == 0, private.stderr.decode()[-3000:]
    plain_train = {w["worker"]: w for w in _lines(tmp_path / "plain" / "workers.jsonl") if w["stage"] == "train"}
    assert plain_train["worker-0"]["status"] == "dropped"
    assert "--require-dp" in plain_train["worker-0"]["reason"]
    assert plain_train["worker-1"]["status"] == "ok"
    dp_train = {w["worker"]: w for w in _lines(tmp_path / "dp" / "workers.jsonl") if w["stage"] == "train"}
    assert dp_train["worker-0"]["status"] == "ok" and dp_train["worker-1"]["status"] == "ok"
    assert _lines(tmp_path / "dp" / "metrics.jsonl")[0]["epsilon"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_central_dp_resume_after_sigkill_is_bit_identical(mnist3: Path, tmp_path: Path) -> None:
    """One secret, two histories: run A is killed in round 3 and resumed; run B runs every round straight.

    Both start from the same secret: A is killed in round 1 (before any checkpoint, after the secret is saved) and
    its folder copied for B, so each resumes with the run's one secret and no round done.
    """
    workers = start_workers([mnist3 / f"shard-{i}.npy" for i in range(3)], extra_args=["--threads", "1"])
    try:
        urls = [w.url for w in workers]
        extra: dict[str, Any] = {
            "rounds": 4, "sampling": {"mode": "poisson", "rate": 0.7, "min_workers": 1},
            "timeouts": {"round": 300, "round_retries": 5},
            "privacy": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.3},
        }
        config_a = _config(tmp_path / "a.yaml", urls, mnist3, tmp_path / "a", **extra)
        kill_coordinator_during_round(config_a, 1)
        assert (tmp_path / "a" / "checkpoint" / "privacy-secret.json").exists()
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        config_b = _config(tmp_path / "b.yaml", urls, mnist3, tmp_path / "b", **extra)
        kill_coordinator_during_round(config_a, 3, "--resume")
        assert [r["round"] for r in _lines(tmp_path / "a" / "metrics.jsonl")] in ([1], [1, 2])
        resumed = _train(config_a, "--resume")
        assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
        straight = _train(config_b, "--resume")
        assert straight.returncode == 0, straight.stderr.decode()[-3000:]
    finally:
        stop_workers(workers)
    a, b = _lines(tmp_path / "a" / "metrics.jsonl"), _lines(tmp_path / "b" / "metrics.jsonl")
    assert [r["round"] for r in a] == [1, 2, 3, 4], "each round exactly once"
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert [r["epsilon"] for r in a] == [r["epsilon"] for r in b]
    assert [r["epsilon"] for r in a] == pytest.approx([compute_epsilon([(0.3, 0.7, r)], 1e-5) for r in range(1, 5)])
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert [r["selected"] for r in a] == [r["selected"] for r in b]
