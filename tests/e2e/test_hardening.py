"""Issue 9's attacks, with real worker processes and real hostile coordinator processes: each attack fails, and the
legitimate job still completes with the result it has without the attacker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.session import SessionOptions
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import LocalWorker, start_worker, start_workers, stop_workers
from fedlink.server.progress import Progress
from fedlink.server.remote import RemoteWorker
from fedlink.shards import load_shard

HERE = Path(__file__).resolve().parent
FAULTY = [sys.executable, str(HERE / "faulty_worker.py")]
CURIOUS = [sys.executable, str(HERE / "curious_coordinator.py")]
MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}}
THREADS = ["--threads", "1"]


def _config(workers: list[Any], out: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "hardening",
        "seed": 3,
        "model": MLP,
        "workers": workers,
        "rounds": 2,
        "sampling": {"min_workers": 2},
        "training": {"epochs": 1, "batch_size": 32, "optimizer": {"lr": 0.1, "momentum": 0.9}},
        "timeouts": {"round": 60, "round_retries": 0, "heartbeat": 1.0, "reconnect_max": 1.0},
        "output": str(out),
    }
    config.update(overrides)
    return config


def _run(config: dict[str, Any], *, resume: bool = False, progress: Progress | None = None) -> tuple[list[dict[str, Any]], str]:
    coordinator = Coordinator(parse_config(config), progress=progress)
    history = asyncio.run(asyncio.wait_for(coordinator.run(resume=resume), 240))
    digest = hashlib.sha256()
    for name in sorted(coordinator.state):
        digest.update(name.encode())
        digest.update(coordinator.state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return history, digest.hexdigest()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _token(tmp_path: Path) -> Path:
    path = tmp_path / "worker.token"
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path


def _curious(mode: str, worker: LocalWorker, *token: Path) -> dict[str, Any]:
    done = subprocess.run([*CURIOUS, mode, worker.url, *map(str, token)], capture_output=True, timeout=300, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- defect 2: overflow poisoning ------------------------------------------------------------------------------------

def test_an_update_of_huge_finite_values_is_refused_and_the_job_resumes(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    honest = start_workers(shards[:2], extra_args=THREADS)
    attacker = start_worker(shards[2], worker_id="worker-2", command=[*FAULTY, "huge"], extra_args=THREADS)
    try:
        _, clean = _run(_config([w.url for w in honest], tmp_path / "clean"))
        urls = [honest[0].url, honest[1].url, attacker.url]
        history, poisoned = _run(_config(urls, tmp_path / "norm"))
        # Without the norm limit, the fold itself refuses the update that would overflow (attacker folded first).
        _, unbounded = _run(_config([attacker.url, *urls[:2]], tmp_path / "fold", limits={"max_update_norm": 1e308}))
        # The same with every update received to disk and folded a slice at a time (a large model's path).
        spill = tmp_path / "spill"
        spill.mkdir()
        on_disk = {"max_update_norm": 1e308, "spill_bytes": 0, "spill_dir": str(spill)}
        _, unbounded_on_disk = _run(_config([attacker.url, *urls[:2]], tmp_path / "fold-disk", limits=on_disk))
        resumed, _ = _run(_config(urls, tmp_path / "norm", rounds=3), resume=True)
    finally:
        stop_workers([*honest, attacker])
    for record in history:
        assert record["workers"] == 2, record
        assert "exceeds limits.max_update_norm" in record["dropped"]["worker-2"], record
    assert poisoned == clean, "the refused update left no trace: same model as without the attacker"
    assert unbounded == clean
    assert unbounded_on_disk == clean, "a spilled update refused by the fold left no trace either"
    for run in ("fold", "fold-disk"):
        fold_refusal = _lines(tmp_path / run / "metrics.jsonl")[0]["dropped"]["worker-2"]
        assert "overflow" in fold_refusal, fold_refusal
    assert all(r["spilled_bytes"] == r["upload_bytes"] > 0 for r in _lines(tmp_path / "fold-disk" / "metrics.jsonl"))
    assert os.listdir(spill) == []
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert resumed[-1]["workers"] == 2


# -- defect 3: self-reported weight ----------------------------------------------------------------------------------

def test_a_worker_claiming_10_to_the_18_samples_gets_a_capped_weight(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, test = digit_shards
    honest = start_workers(shards, extra_args=THREADS)  # worker-2 honest, for the reference run
    claimer = start_worker(shards[2], worker_id="worker-2", command=[*FAULTY, "claim"], extra_args=THREADS)
    true_size = load_shard(shards[2]).num_samples
    evaluation = {"data": str(test)}
    try:
        reference, clean = _run(_config([w.url for w in honest], tmp_path / "clean", evaluation=evaluation))
        entries = [honest[0].url, honest[1].url, {"url": claimer.url, "max_samples": true_size}]
        _, capped = _run(_config(entries, tmp_path / "capped"))
        shared, _ = _run(_config([honest[0].url, honest[1].url, claimer.url], tmp_path / "share", evaluation=evaluation))
        _run(_config([honest[0].url, honest[1].url, claimer.url], tmp_path / "open",
                     sampling={"min_workers": 2, "max_weight_share": 1.0}))
    finally:
        stop_workers([*honest, claimer])
    assert capped == clean, "capped at its true size, the claimer weighs what an honest worker does"
    others = sum(load_shard(s).num_samples for s in shards[:2])
    share = [w for w in _lines(tmp_path / "share" / "workers.jsonl") if w["worker"] == "worker-2"]
    assert [w["samples"] for w in share] == [others, others], "no more than half of the round's weight"
    assert shared[-1]["accuracy"] > reference[-1]["accuracy"] - 0.1, "an honest update at half the weight: no harm"
    opened = [w for w in _lines(tmp_path / "open" / "workers.jsonl") if w["worker"] == "worker-2"]
    assert opened[0]["samples"] == 10**18, "with the cap turned off the claim is taken as it is"


# -- defect 4: orphaned jobs -----------------------------------------------------------------------------------------

def test_coordinators_hanging_up_mid_job_never_leave_two_trainings_running(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    worker = start_worker(shards[0], worker_id="worker-0", extra_args=THREADS)
    try:
        answers = [_curious("hangup", worker) for _ in range(6)]
        history, _ = _run(_config([worker.url], tmp_path / "run", rounds=1, sampling={"min_workers": 1}))
    finally:
        stop_workers([worker])
    assert sum(1 for a in answers if a.get("sent")) >= 3, answers
    assert all(a.get("sent") or a.get("refused") == "busy" for a in answers), answers
    assert history[0]["workers"] == 1, "the legitimate one-epoch job gets its answer"
    events = re.findall(r"job (\d+) (started|ended)", worker.log_path.read_text())
    running = 0
    for _, what in events:
        running += 1 if what == "started" else -1
        assert running in (0, 1), f"two jobs at once: {events}"
    assert running == 0 and len(events) >= 2 * 4, events


# -- defect 5: work before any limit ---------------------------------------------------------------------------------

def test_a_100_byte_request_for_a_huge_model_is_refused_while_others_connect(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    worker = start_worker(shards[0], worker_id="worker-0", extra_args=[*THREADS, "--max-state-mb", "64"])
    try:
        deep = subprocess.Popen([*CURIOUS, "deep", worker.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while "job 1 started: train" not in worker.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker's log is the only sign that it is building the model now
        assert deep.poll() is None, "still building when the second coordinator dials"
        connected = asyncio.run(_connect(worker.url))
        out, err = deep.communicate(timeout=300)
        answer = json.loads(out.strip().splitlines()[-1])
        refused_at = time.time()
        history, _ = _run(_config([worker.url], tmp_path / "run", rounds=1, sampling={"min_workers": 1}))
    finally:
        stop_workers([worker])
    assert answer["refused"] == "model_too_large", (answer, err[-2000:])
    assert "--max-state-mb" in answer["message"]
    assert connected < refused_at
    assert history[0]["workers"] == 1


async def _connect(url: str) -> float:
    remote = RemoteWorker(url)
    ok = await remote.connect(hello=Hello(role="coordinator", peer_id="other"), limits=Limits(), timeout=30, options=SessionOptions())
    assert ok, remote.last_error
    at = time.time()
    await remote.close("done")
    return at


# -- the worker's operator decides what leaves the site ----------------------------------------------------------------

def test_the_sample_extraction_attack_is_refused_by_the_default_policy(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    token = _token(tmp_path)
    guarded = start_worker(shards[0], worker_id="worker-0", extra_args=[*THREADS, "--token-file", str(token)])
    careless = start_worker(
        shards[1], worker_id="worker-1",
        extra_args=[*THREADS, "--token-file", str(token), "--min-batch-size", "1", "--min-samples", "1"],
    )
    config = {**_config([guarded.url], tmp_path / "before", rounds=1, sampling={"min_workers": 1}), "auth": {"token_file": str(token)}}
    try:
        _, before = _run(config)
        refused = _curious("extract", guarded, token)
        leaked = _curious("extract", careless, token)
        _, after = _run({**config, "output": str(tmp_path / "after")})
    finally:
        stop_workers([guarded, careless])
    assert refused["refused"] == "policy_refused", refused
    assert "min_batch_size (--min-batch-size)" in refused["message"]
    # The same attack on a worker whose operator lowered the floor reads a training sample exactly.
    x = np.array(leaked["x"])
    rows = np.asarray(load_shard(shards[1]).to_tensors()[0].reshape(-1, 64))
    assert np.abs(rows - x).max(axis=1).min() < 1e-3
    assert after == before, "the legitimate job's result is the same as without the attacker"


class _Refusals(Progress):
    def __init__(self) -> None:
        super().__init__()
        self.refused: list[tuple[str, str]] = []

    def policy_refused(self, worker: str, reason: str) -> None:
        self.refused.append((worker, reason))


def test_a_policy_refusal_is_reported_per_worker(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    strict = start_worker(shards[0], worker_id="strict", extra_args=[*THREADS, "--min-batch-size", "64"])
    plain = start_worker(shards[1], worker_id="plain", extra_args=THREADS)
    progress = _Refusals()
    try:
        history, _ = _run(_config([strict.url, plain.url], tmp_path / "run", rounds=1, sampling={"min_workers": 1}), progress=progress)
    finally:
        stop_workers([strict, plain])
    reason = history[0]["dropped"]["strict"]
    assert reason.startswith("policy_refused") and "policy min_batch_size (--min-batch-size)" in reason, reason
    assert history[0]["workers"] == 1
    assert progress.refused == [("strict", reason)]
    lines = _lines(tmp_path / "run" / "workers.jsonl")
    assert any(w["worker"] == "strict" and w["reason"] == reason for w in lines)
