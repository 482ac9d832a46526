"""Prometheus endpoints during a real run: two ``fl-worker --metrics-port 0`` processes and a coordinator, all
scraped over HTTP at the end of every round (the coordinator's round event, never a timer) and parsed with
``prometheus_client.parser``. Rounds, bytes and contributions must move as the run goes; TensorBoard events are
written live in the same run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fedlink
from fedlink.models import mlp
from fedlink.server.observers import ProgressEvent, ProgressGroup
from fedlink.server.prometheus import CoordinatorMetrics

from ..metrics_text import Samples, scrape

pytestmark = pytest.mark.timeout(180)

ROUNDS = 3
KWARGS = {"in_features": 64, "hidden": 32, "num_classes": 10}


def _metrics_url(log: Path) -> str:
    """The worker logs its metrics URL before it prints its ready line, so the line is there once it is ready."""
    found = re.search(r"serving metrics on (http://\S+)", log.read_text(encoding="utf-8"))
    assert found, f"{log} names no metrics URL"
    return found.group(1)


def test_counters_move_during_a_run(tmp_path: Path, digit_shards: tuple[list[Path], Path]) -> None:
    shards, test = digit_shards
    model_bytes = sum(t.numel() * t.element_size() for t in mlp(**KWARGS).state_dict().values())
    coordinator_scrapes: list[Samples] = []
    worker_scrapes: list[list[Samples]] = []
    exporter = CoordinatorMetrics()
    with fedlink.LocalWorkers(shards[:2], args=["--threads", "1", "--metrics-port", "0"], log_dir=tmp_path / "logs") as workers:
        worker_urls = [_metrics_url(w.log_path) for w in workers.workers]
        coordinator_url = exporter.serve(host="127.0.0.1", port=0)

        def on_event(event: ProgressEvent) -> None:
            if event.kind == "round_finished":  # the exporter, earlier in the group, has already counted it
                coordinator_scrapes.append(scrape(coordinator_url))
                worker_scrapes.append([scrape(url) for url in worker_urls])

        config: dict[str, Any] = {
            "name": "metrics-live", "seed": 0, "rounds": ROUNDS, "workers": workers.urls,
            "model": {"factory": "fedlink.models:mlp", "kwargs": KWARGS},
            "training": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.1}},
            "evaluation": {"data": str(test)},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": True},
        }
        with exporter:
            history = fedlink.train(config, progress=ProgressGroup([exporter, fedlink.CallbackProgress(on_event)]))

    assert [r.round for r in history] == [1, 2, 3]
    assert len(coordinator_scrapes) == ROUNDS == len(worker_scrapes)

    def c(i: int, name: str, **labels: str) -> float:
        return coordinator_scrapes[i][(name, tuple(sorted(labels.items())))]

    assert [c(i, "fedlink_rounds_completed_total") for i in range(ROUNDS)] == [1, 2, 3]
    assert [c(i, "fedlink_worker_contributions_total") for i in range(ROUNDS)] == [2, 4, 6]
    assert [c(i, "fedlink_workers_contributed") for i in range(ROUNDS)] == [2, 2, 2]
    assert [c(i, "fedlink_round") for i in range(ROUNDS)] == [1, 2, 3]
    assert all(c(i, "fedlink_workers_connected") == 2 for i in range(ROUNDS))
    assert c(ROUNDS - 1, "fedlink_accuracy") == pytest.approx(history[-1].accuracy)
    sent = [c(i, "fedlink_bytes_sent_total") for i in range(ROUNDS)]
    received = [c(i, "fedlink_bytes_received_total") for i in range(ROUNDS)]
    assert sent[0] >= 2 * model_bytes and sent[-1] >= 2 * ROUNDS * model_bytes, (sent, model_bytes)
    assert received[0] >= 2 * model_bytes and received == sorted(received) and received[-1] > received[0]
    assert c(ROUNDS - 1, "fedlink_round_seconds_count") == ROUNDS

    for w in range(2):
        def v(i: int, name: str, w: int = w, **labels: str) -> float:
            return worker_scrapes[i][w][(name, tuple(sorted(labels.items())))]

        jobs = [v(i, "fedlink_worker_jobs_total", kind="train", outcome="ok") for i in range(ROUNDS)]
        assert jobs == sorted(jobs) and jobs[0] >= 1 and jobs[-1] == ROUNDS, jobs
        got = [v(i, "fedlink_worker_bytes_received_total") for i in range(ROUNDS)]
        assert got[0] >= model_bytes and got[-1] > got[0] and got[-1] >= ROUNDS * model_bytes, got
        assert v(ROUNDS - 1, "fedlink_worker_bytes_sent_total") >= ROUNDS * model_bytes
        assert v(0, "fedlink_worker_coordinators_connected") == 1
        assert v(0, "fedlink_worker_auth_failures_total") == 0 and v(0, "fedlink_worker_malformed_frames_total") == 0
        assert v(0, "process_resident_memory_bytes") > 10e6

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy")] == [1, 2, 3]
