"""The worker's Prometheus exporter (``fl-worker --metrics-port P``): jobs, bytes, refusals, process memory.

:class:`WorkerMetrics` receives the daemon's :class:`~fedlink.worker.events.DaemonEvents` and keeps its own
registry. Bytes and frames are read from the live sessions' counters at scrape time, with totals that survive
reconnects. Labels are bounded: job kind and outcome, and refusal codes mapped to a few categories; the
worker's id appears once, in ``fedlink_worker_info``. Nothing a peer sends ever becomes a label.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from fedlink.telemetry import MetricsServer, SessionTally, TallyCollector, serve_registry

from .events import DaemonEvents

if TYPE_CHECKING:
    from fedlink.protocol.errors import ProtocolError
    from fedlink.protocol.session import Session

__all__ = ["WorkerMetrics", "REFUSAL_CODES"]

log = logging.getLogger("fedlink.worker")

REFUSAL_CODES = ("busy", "model_not_allowed", "bad_request", "policy", "other")
_KINDS = ("train", "evaluate", "stage")
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class WorkerMetrics(DaemonEvents):
    """Metrics of one worker daemon; ``daemon.events = WorkerMetrics(...)``, then :meth:`serve`."""

    def __init__(
        self, *, worker_id: str, version: str = "", samples: int = 0, registry: CollectorRegistry | None = None,
        process: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tally = SessionTally()
        self.server: MetricsServer | None = None
        r = self.registry
        Gauge("fedlink_worker_info", "1, labelled with this worker's id and software version.",
              ["worker", "version"], registry=r).labels(worker=worker_id, version=version).set(1)
        Gauge("fedlink_worker_samples", "Samples in this worker's shard.", registry=r).set(samples)
        self.jobs = Counter("fedlink_worker_jobs", "Jobs run, by kind and outcome.", ["kind", "outcome"], registry=r)
        self.job_seconds = Histogram(
            "fedlink_worker_job_seconds", "Seconds per job, transfers included.", ["kind"],
            buckets=_JOB_BUCKETS, registry=r,
        )
        self.job_running = Gauge("fedlink_worker_requests_running", "Requests being served now.", registry=r)
        self.connected = Gauge("fedlink_worker_coordinators_connected", "Coordinator sessions open now.", registry=r)
        self.sessions = Counter("fedlink_worker_sessions", "Coordinator sessions opened.", registry=r)
        self.auth_failures = Counter(
            "fedlink_worker_auth_failures", "Connections refused: the peer did not prove it holds the token.",
            registry=r,
        )
        self.handshake_failures = Counter(
            "fedlink_worker_handshake_failures", "Connections refused during the handshake (auth included).",
            registry=r,
        )
        self.refusals = Counter(
            "fedlink_worker_refusals", "Requests refused before any work, by reason.", ["reason"], registry=r,
        )
        for kind in _KINDS:
            self.job_seconds.labels(kind=kind)
            for outcome in ("ok", "failed"):
                self.jobs.labels(kind=kind, outcome=outcome)
        for code in REFUSAL_CODES:
            self.refusals.labels(reason=code)
        r.register(TallyCollector(self.tally, "fedlink_worker", "coordinators"))
        if process:
            ProcessCollector(registry=r)

    def serve(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve ``/metrics`` from a daemon thread; returns its URL."""
        self.server = serve_registry(self.registry, host=host, port=port)
        return self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- daemon events ---------------------------------------------------------------------------------------------

    def session_opened(self, session: "Session") -> None:
        self.tally.track(session)
        self.sessions.inc()
        self.connected.inc()

    def session_closed(self, session: "Session", reason: str) -> None:
        self.connected.dec()

    def handshake_refused(self, peer: str, error: "ProtocolError") -> None:
        from fedlink.protocol.errors import AuthenticationFailed

        self.handshake_failures.inc()
        if isinstance(error, AuthenticationFailed):
            self.auth_failures.inc()

    def request_refused(self, code: str) -> None:
        code = "policy" if code.startswith("policy") else code
        self.refusals.labels(reason=code if code in REFUSAL_CODES else "other").inc()

    def job_started(self, kind: str) -> None:
        self.job_running.inc()

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None:
        self.job_running.dec()
        if outcome == "refused":
            return  # counted in fedlink_worker_refusals; it never became a job
        kind = kind if kind in _KINDS else "other"
        self.jobs.labels(kind=kind, outcome="ok" if outcome == "ok" else "failed").inc()
        self.job_seconds.labels(kind=kind).observe(seconds)
