"""The coordinator's Prometheus exporter: a run's progress as metrics on ``/metrics`` (``metrics:`` in the config).

:class:`CoordinatorMetrics` is a :class:`~fedlink.server.progress.Progress` observer: the round engine's events
update counters, gauges and histograms in a registry of its own (never the process-global one, so that two
coordinators in one process do not mix). Bytes and frames are read from the workers' sessions at scrape time.

Labels stay bounded and secret-free: drop, disconnect and refusal reasons are mapped to a handful of
categories (the full text is in the logs and ``metrics.jsonl``), stage names are capped, and per-worker series
(``fedlink_peer_*{worker=...}``) exist only for the first ``max_labelled_workers`` workers and can be turned
off. Transfer throughput is ``rate(fedlink_bytes_received_total[1m])`` in PromQL.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from fedlink.telemetry import BoundedLabels, Counted, MetricsServer, SessionTally, TallyCollector, serve_registry

from .progress import Progress

__all__ = [
    "CoordinatorMetrics",
    "DROP_REASONS",
    "REFUSAL_REASONS",
    "drop_category",
    "refusal_category",
]

log = logging.getLogger("fedlink.server")

DROP_REASONS = ("deadline", "disconnected", "refused", "invalid_update", "error")
REFUSAL_REASONS = ("model_not_allowed", "busy", "policy", "bad_request", "other")
_DISCONNECT_REASONS = ("closed", "heartbeat", "shutdown", "error")
_TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_FAST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def drop_category(reason: str) -> str:
    """One of :data:`DROP_REASONS` for a drop's text (or error code); the text itself never becomes a label."""
    text = reason.lower()
    code = text.split(" ", 1)[0].rstrip(":")
    if code in ("timeout", "deadline") or "deadline" in text or "timed out" in text:
        return "deadline"
    if code in ("busy", "model_not_allowed", "bad_request", "policy", "refused") or code in REFUSAL_REASONS:
        return "refused"
    if code in ("closed", "transfer_failed") or "closed" in text or "lost" in text or "disconnect" in text:
        return "disconnected"
    if code in ("invalid_update", "state_mismatch", "limit_exceeded", "malformed") or any(
        word in text for word in ("nan or infinite", "samples", "expected", "mismatch", "too large", "exceeds")
    ):
        return "invalid_update"
    return "error"


def refusal_category(reason: str) -> str:
    """One of :data:`REFUSAL_REASONS` for a policy refusal's text or code."""
    text = reason.lower()
    for category in ("model_not_allowed", "busy", "bad_request"):
        if text.startswith(category) or category.replace("_", " ") in text:
            return category
    return "policy" if "polic" in text else "other"


def _disconnect_category(reason: str) -> str:
    text = reason.lower()
    if "heartbeat" in text or "nothing heard" in text:
        return "heartbeat"
    if "shutting down" in text or "finished" in text or "goodbye" in text:
        return "shutdown"
    if "closed" in text or "lost" in text:
        return "closed"
    return "error"


class _Bound(Protocol):
    """What :meth:`CoordinatorMetrics.bind` reads of a coordinator: its pool of remote workers."""

    @property
    def pool(self) -> Any: ...


class CoordinatorMetrics(Progress):
    """Prometheus metrics of a coordinator's run; serve them with :meth:`serve`, read them with ``registry``.

    ``per_worker`` adds ``fedlink_peer_*`` series labelled by worker id, for at most ``max_labelled_workers``
    workers (later ones are counted in the totals only).
    """

    def __init__(
        self,
        *,
        per_worker: bool = True,
        max_labelled_workers: int = 100,
        registry: CollectorRegistry | None = None,
        process: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tally = SessionTally()
        self.server: MetricsServer | None = None
        self._workers = BoundedLabels(max_labelled_workers if per_worker else 0, overflow=None)
        self._stages = BoundedLabels(16)
        self._connected: set[str] = set()
        self._seen: set[str] = set()
        self._pool_connected: Callable[[], int] | None = None
        self._warned_workers = False
        r = self.registry
        self.rounds_completed = Counter("fedlink_rounds_completed", "Rounds aggregated and recorded.", registry=r)
        self.rounds_planned = Gauge("fedlink_rounds_planned", "Rounds the job asks for.", registry=r)
        self.last_round = Gauge("fedlink_round", "The last completed round.", registry=r)
        self.round_seconds = Histogram(
            "fedlink_round_seconds", "Seconds from dispatch to the aggregated model, per round.",
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.round_wall_seconds = Histogram(
            "fedlink_round_wall_seconds", "Seconds from the previous round's model to this one's.",
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.stage_seconds = Histogram(
            "fedlink_stage_seconds", "Seconds per stage of a round.", ["stage"], buckets=_TIME_BUCKETS, registry=r,
        )
        self.aggregation_seconds = Histogram(
            "fedlink_aggregation_seconds", "Seconds spent aggregating a round's updates.",
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.workers_connected = Gauge("fedlink_workers_connected", "Workers connected now.", registry=r)
        self.workers_connected.set_function(self._connected_now)
        self.workers_selected = Gauge("fedlink_workers_selected", "Workers asked in the last round.", registry=r)
        self.workers_contributed = Gauge(
            "fedlink_workers_contributed", "Workers whose update went into the last round's model.", registry=r,
        )
        self.selections = Counter("fedlink_worker_selections", "Workers asked, summed over rounds.", registry=r)
        self.contributions = Counter(
            "fedlink_worker_contributions", "Updates aggregated, summed over rounds.", registry=r,
        )
        self.samples = Counter("fedlink_samples", "Training samples behind the aggregated updates.", registry=r)
        self.dropped = Counter(
            "fedlink_workers_dropped", "Workers dropped from a round, by reason category.", ["reason"], registry=r,
        )
        self.disconnects = Counter(
            "fedlink_worker_disconnects", "Connections to workers lost, by reason category.", ["reason"], registry=r,
        )
        self.reconnects = Counter(
            "fedlink_worker_reconnects", "Workers connected again after a lost connection.", registry=r,
        )
        self.auth_failures = Counter(
            "fedlink_auth_failures", "Connections refused because the peer did not prove its token.", registry=r,
        )
        self.handshake_failures = Counter(
            "fedlink_handshake_failures", "Connections refused during the handshake (authentication included).",
            registry=r,
        )
        self.policy_refusals = Counter(
            "fedlink_policy_refusals", "Requests workers refused under their operators' policy, by reason.",
            ["reason"], registry=r,
        )
        self.epsilon = Gauge("fedlink_privacy_epsilon", "Privacy budget spent so far (epsilon).", registry=r)
        self.accuracy = Gauge("fedlink_accuracy", "Held-out accuracy of the last evaluated round.", registry=r)
        self.loss = Gauge("fedlink_loss", "Held-out loss of the last evaluated round.", registry=r)
        self.train_loss = Gauge("fedlink_train_loss", "Sample-weighted training loss of the last round.", registry=r)
        self.roc_auc = Gauge("fedlink_roc_auc", "Held-out ROC AUC of the last evaluated round.", registry=r)
        self.run_info = Gauge("fedlink_run_info", "1, labelled with the job's name.", ["run"], registry=r)
        self.peer_up = Gauge("fedlink_peer_up", "1 while this worker is connected.", ["worker"], registry=r)
        self.peer_contributions = Counter(
            "fedlink_peer_contributions", "Rounds this worker's update was aggregated in.", ["worker"], registry=r,
        )
        self.peer_drops = Counter("fedlink_peer_drops", "Rounds this worker was dropped from.", ["worker"], registry=r)
        for gauge in (self.epsilon, self.accuracy, self.loss, self.train_loss, self.roc_auc):
            gauge.set(math.nan)  # nothing measured yet is not zero
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for reason in _DISCONNECT_REASONS:
            self.disconnects.labels(reason=reason)
        for reason in REFUSAL_REASONS:
            self.policy_refusals.labels(reason=reason)
        r.register(TallyCollector(self.tally, "fedlink", "workers"))
        if process:
            ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux)

    # -- serving ---------------------------------------------------------------------------------------------------

    def serve(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving ``/metrics``; returns its URL. Stopped by :meth:`close` (or leaving the ``with``)."""
        if self.server is not None:
            raise RuntimeError(f"metrics already served on {self.server.url}")
        self.server = serve_registry(self.registry, host=host, port=port)
        log.info("serving metrics on %s", self.server.url)
        return self.server.url

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def bind(self, coordinator: _Bound) -> None:
        """Read bytes, frames and the number of connected workers from ``coordinator``'s pool at scrape time."""
        pool = coordinator.pool

        def sessions() -> Iterable[Counted]:
            return [w.session for w in pool.all() if w.session is not None]

        self.tally.watch(sessions)
        self._pool_connected = lambda: len(pool.connected())

    def watch_sessions(self, sessions: Callable[[], Iterable[Counted]]) -> None:
        self.tally.watch(sessions)

    def _connected_now(self) -> float:
        if self._pool_connected is not None:
            try:
                return float(self._pool_connected())
            except Exception:  # noqa: BLE001 - a scrape racing the pool's changes reads the event count instead
                pass
        return float(len(self._connected))

    def _worker_label(self, worker: str) -> str | None:
        label = self._workers.admit(worker)
        if label is None and self._workers.limit and not self._warned_workers:
            self._warned_workers = True
            log.warning("more than %d workers: per-worker metrics only for the first ones", self._workers.limit)
        return label

    # -- events ----------------------------------------------------------------------------------------------------

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        self.rounds_planned.set(rounds)
        self.run_info.labels(run=name).set(1)

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        label = self._worker_label(worker)
        if status == "dropped":
            self.dropped.labels(reason=drop_category(detail)).inc()
            if label is not None:
                self.peer_drops.labels(worker=label).inc()
        elif status == "done" and label is not None:
            self.peer_contributions.labels(worker=label).inc()

    def stage_finished(self, server_round: int, stage: str, seconds: float, outcomes: Sequence[Any]) -> None:
        name = self._stages.admit(stage) or "other"
        self.stage_seconds.labels(stage=name).observe(seconds)
        if stage in ("aggregate", "aggregation"):
            self.aggregation_seconds.observe(seconds)

    def worker_connected(self, worker: str) -> None:
        if worker in self._seen:
            self.reconnects.inc()
        self._seen.add(worker)
        self._connected.add(worker)
        label = self._worker_label(worker)
        if label is not None:
            self.peer_up.labels(worker=label).set(1)

    def worker_disconnected(self, worker: str, reason: str) -> None:
        self._connected.discard(worker)
        self.disconnects.labels(reason=_disconnect_category(reason)).inc()
        label = self._worker_label(worker)
        if label is not None:
            self.peer_up.labels(worker=label).set(0)

    def policy_refused(self, worker: str, reason: str) -> None:
        self.policy_refusals.labels(reason=refusal_category(reason)).inc()

    def connection_refused(self, peer: str, reason: str, *, auth: bool = False) -> None:
        self.handshake_failures.inc()
        if auth:
            self.auth_failures.inc()

    def round_finished(self, record: dict[str, Any]) -> None:
        self.rounds_completed.inc()
        self.last_round.set(record["round"])
        seconds = record.get("round_seconds", record.get("seconds"))
        if seconds is not None:
            self.round_seconds.observe(float(seconds))
        if record.get("wall_seconds") is not None:
            self.round_wall_seconds.observe(float(record["wall_seconds"]))
        if record.get("aggregation_seconds") is not None:
            self.aggregation_seconds.observe(float(record["aggregation_seconds"]))
        selected, contributed = int(record.get("selected", 0)), int(record.get("workers", 0))
        self.workers_selected.set(selected)
        self.workers_contributed.set(contributed)
        self.selections.inc(selected)
        self.contributions.inc(contributed)
        self.samples.inc(int(record.get("samples", 0)))
        for key, gauge in (
            ("accuracy", self.accuracy), ("loss", self.loss), ("train_loss", self.train_loss),
            ("roc_auc", self.roc_auc), ("epsilon", self.epsilon),
        ):
            value = record.get(key)
            if value is not None:
                gauge.set(float(value))
