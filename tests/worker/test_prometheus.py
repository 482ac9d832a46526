"""The worker's exporter and the daemon's request observer, with the daemon's real error classes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from fedlink.errors import ModelNotAllowed
from fedlink.protocol.errors import AuthenticationFailed, HandshakeFailed
from fedlink.worker.cli import main as worker_cli
from fedlink.worker.errors import WorkerBusy
from fedlink.worker.events import observe_requests
from fedlink.worker.prometheus import WorkerMetrics

from ..metrics_text import read_registry


@dataclass
class _Message:
    type: str


@dataclass
class _Inbound:
    message: _Message


def _run(metrics: WorkerMetrics, kind: str, error: BaseException | None) -> None:
    async def handler(session: object, inbound: object) -> None:
        if error is not None:
            raise error

    observed = observe_requests(handler, metrics)  # type: ignore[arg-type]
    try:
        asyncio.run(observed(None, _Inbound(_Message(kind))))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the observer re-raises what the handler raised
        assert exc is error


def test_jobs_refusals_and_handshakes_are_counted() -> None:
    metrics = WorkerMetrics(worker_id="site-a", version="0.1.0", samples=750, process=False)
    _run(metrics, "train", None)
    _run(metrics, "train", None)
    _run(metrics, "evaluate", RuntimeError("out of memory"))
    _run(metrics, "train", WorkerBusy("worker 'site-a' is busy with another job"))
    _run(metrics, "train", ModelNotAllowed("evil:model is not allowed"))
    _run(metrics, "heartbeat", RuntimeError("not a job"))  # not a job: passed through uncounted
    metrics.handshake_refused("127.0.0.1:4444", AuthenticationFailed("the coordinator did not prove the token"))
    metrics.handshake_refused("127.0.0.1:4445", HandshakeFailed("no hello in 10s"))
    s = read_registry(metrics.registry)
    assert s[("fedlink_worker_jobs_total", (("kind", "train"), ("outcome", "ok")))] == 2
    assert s[("fedlink_worker_jobs_total", (("kind", "evaluate"), ("outcome", "failed")))] == 1
    assert s[("fedlink_worker_job_seconds_count", (("kind", "train"),))] == 2, "refusals are not jobs"
    assert s[("fedlink_worker_refusals_total", (("reason", "busy"),))] == 1
    assert s[("fedlink_worker_refusals_total", (("reason", "model_not_allowed"),))] == 1
    assert s[("fedlink_worker_requests_running", ())] == 0
    assert s[("fedlink_worker_auth_failures_total", ())] == 1
    assert s[("fedlink_worker_handshake_failures_total", ())] == 2
    assert s[("fedlink_worker_info", (("version", "0.1.0"), ("worker", "site-a")))] == 1
    assert s[("fedlink_worker_samples", ())] == 750


def test_cli_takes_a_metrics_port() -> None:
    with worker_cli.make_context("fl-worker", ["--data", "x.npy", "--metrics-port", "9100"]) as ctx:
        assert ctx.params["metrics_port"] == 9100 and ctx.params["metrics_host"] == "127.0.0.1"
    with pytest.raises(Exception, match="65536"):
        worker_cli.make_context("fl-worker", ["--data", "x.npy", "--metrics-port", "65536"])
