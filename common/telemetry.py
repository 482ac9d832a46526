"""What both Prometheus exporters share: byte and frame totals over many sessions, bounded labels, the server.

A session's counters (``Session.counters``) live as long as its connection; a worker that reconnects gets a
new session whose counters start from zero. :class:`SessionTally` keeps running totals that never go down
across reconnects, as a Prometheus counter must. :class:`BoundedLabels` keeps a label (stage names, worker
ids) to at most ``limit`` distinct values, so that no peer can grow the number of series without end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "COUNTER_FIELDS", "Counted", "SessionTally", "BoundedLabels", "TallyCollector", "MetricsServer", "serve_registry",
]

COUNTER_FIELDS = ("bytes_in", "bytes_out", "frames_in", "malformed")


class _Counters(Protocol):
    bytes_in: int
    bytes_out: int
    frames_in: int
    malformed: int


class Counted(Protocol):
    """What a tally reads of a session: its counters, and whether it is closed (its counters final)."""

    @property
    def counters(self) -> _Counters: ...

    @property
    def closed(self) -> bool: ...


class SessionTally:
    """Totals of ``COUNTER_FIELDS`` over every session ever tracked; safe to read from a scrape thread.

    Sessions come from :meth:`track` (the daemon hands each new one over) and from ``sessions``, a callable
    asked at every reading (the coordinator's pool). A closed session's final counts move into the retired
    totals and the session is let go.
    """

    def __init__(self, sessions: Callable[[], Iterable[Counted]] | None = None) -> None:
        self._provider = sessions
        self._live: dict[int, Counted] = {}
        self._retired = dict.fromkeys(COUNTER_FIELDS, 0)
        self._lock = threading.Lock()

    def watch(self, sessions: Callable[[], Iterable[Counted]]) -> None:
        """Ask ``sessions`` for the current sessions at every reading (replaces an earlier provider)."""
        self._provider = sessions

    def track(self, session: Counted) -> None:
        with self._lock:
            self._live.setdefault(id(session), session)

    def totals(self) -> dict[str, int]:
        provided = list(self._provider()) if self._provider is not None else []
        with self._lock:
            for session in provided:
                self._live.setdefault(id(session), session)
            totals = dict(self._retired)
            for key, session in list(self._live.items()):
                closed = session.closed  # read first: counts read after seeing it closed are final
                for field in COUNTER_FIELDS:
                    value = int(getattr(session.counters, field))
                    totals[field] += value
                    if closed:
                        self._retired[field] += value
                if closed:
                    del self._live[key]
            return totals


class BoundedLabels:
    """Admits the first ``limit`` distinct values of a label; later ones map to ``overflow`` (or None: skip)."""

    def __init__(self, limit: int, *, overflow: str | None = "other") -> None:
        if limit < 0:
            raise ValueError(f"limit must be at least 0, not {limit}")
        self.limit = limit
        self.overflow = overflow
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return len(self._seen) >= self.limit

    def admit(self, value: str) -> str | None:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
            return self.overflow


class TallyCollector(Collector):
    """Byte and frame counters read from the sessions when Prometheus scrapes, never stored twice."""

    def __init__(self, tally: SessionTally, prefix: str, side: str) -> None:
        self._tally = tally
        self._prefix = prefix
        self._side = side

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = self._tally.totals()
        p, side = self._prefix, self._side
        yield CounterMetricFamily(f"{p}_bytes_received", f"Bytes received from {side} (WebSocket payloads).",
                                  value=totals["bytes_in"])
        yield CounterMetricFamily(f"{p}_bytes_sent", f"Bytes sent to {side} (WebSocket payloads).",
                                  value=totals["bytes_out"])
        yield CounterMetricFamily(f"{p}_frames_received", f"Frames received from {side}.", value=totals["frames_in"])
        yield CounterMetricFamily(f"{p}_malformed_frames", f"Malformed frames received from {side} (and skipped).",
                                  value=totals["malformed"])


class MetricsServer:
    """A running ``/metrics`` HTTP server over one registry; :meth:`close` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_registry(registry: CollectorRegistry, *, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread (port 0: any free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, host)
