"""Several observers of one run: the display, the Prometheus exporter, TensorBoard, a notebook's callback.

The coordinator reports to one :class:`~fedlink.server.progress.Progress`; :class:`ProgressGroup` passes each
event on to many, in order. Monitoring must never stop training: an observer that raises is logged and the run
goes on. :func:`run_observers` builds the group a job's config asks for (``metrics:``, ``output.tensorboard``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from .config import JobConfig
from .errors import ConfigError
from .progress import Progress

__all__ = ["ProgressGroup", "ProgressEvent", "CallbackProgress", "run_observers", "CONFIG_FILE"]

log = logging.getLogger("fedlink.server")

CONFIG_FILE = "config.json"


class ProgressGroup(Progress):
    """Passes every event to each of ``observers`` in order; entering the group enters them all."""

    def __init__(self, observers: Sequence[Progress]) -> None:
        self.observers = list(observers)
        self._stack: ExitStack | None = None
        self._failed: set[tuple[int, str]] = set()

    def __enter__(self) -> "ProgressGroup":
        with ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def bind(self, coordinator: Any) -> None:
        """Hand ``coordinator`` to the observers that read from it at their own pace (the exporter's bytes)."""
        for observer in self.observers:
            bind = getattr(observer, "bind", None)
            if callable(bind):
                bind(coordinator)

    def find(self, kind: type[Progress]) -> Progress | None:
        """The first observer of type ``kind`` (for instance the exporter, to read its URL)."""
        return next((o for o in self.observers if isinstance(o, kind)), None)

    def _each(self, event: str, *args: Any, **kwargs: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a monitoring failure must not stop the federation
                key = (id(observer), event)
                if key not in self._failed:  # once per observer and event, not once per round
                    self._failed.add(key)
                    log.exception("observer %s failed on %s; the run goes on", type(observer).__name__, event)

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        self._each("run_started", name, rounds, workers)

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        self._each("worker_status", server_round, worker, status, detail)

    def round_finished(self, record: dict[str, Any]) -> None:
        self._each("round_finished", record)

    def stage_finished(self, server_round: int, stage: str, seconds: float, outcomes: Sequence[Any]) -> None:
        self._each("stage_finished", server_round, stage, seconds, outcomes)

    def worker_connected(self, worker: str) -> None:
        self._each("worker_connected", worker)

    def worker_disconnected(self, worker: str, reason: str) -> None:
        self._each("worker_disconnected", worker, reason)

    def policy_refused(self, worker: str, reason: str) -> None:
        self._each("policy_refused", worker, reason)

    def connection_refused(self, peer: str, reason: str, *, auth: bool = False) -> None:
        self._each("connection_refused", peer, reason, auth=auth)


@dataclass(frozen=True)
class ProgressEvent:
    """One event of a run, as a notebook callback receives it.

    ``kind`` is the observer method's name (``run_started``, ``worker_status``, ``round_finished``,
    ``stage_finished``, ``worker_connected``, ``worker_disconnected``, ``policy_refused``, ``connection_refused``);
    ``data`` holds its arguments by name (for ``round_finished``, the round's record itself).
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def round(self) -> int | None:
        value = self.data.get("round", self.data.get("server_round"))
        return int(value) if value is not None else None


class CallbackProgress(Progress):
    """Calls ``fn(event)`` with a :class:`ProgressEvent` for every event: progress in notebooks and scripts.

    ``fn`` runs on the coordinator's event loop: keep it quick. Inside a :class:`ProgressGroup` (as
    ``fedlink.train`` uses it) an exception it raises is logged and the run goes on.
    """

    def __init__(self, fn: Callable[[ProgressEvent], object]) -> None:
        self.fn = fn

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        self.fn(ProgressEvent("run_started", {"name": name, "rounds": rounds, "workers": list(workers)}))

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        self.fn(ProgressEvent("worker_status", {"round": server_round, "worker": worker, "status": status, "detail": detail}))

    def round_finished(self, record: dict[str, Any]) -> None:
        self.fn(ProgressEvent("round_finished", dict(record)))

    def stage_finished(self, server_round: int, stage: str, seconds: float, outcomes: Sequence[Any]) -> None:
        self.fn(ProgressEvent("stage_finished", {"round": server_round, "stage": stage, "seconds": seconds,
                                                 "outcomes": list(outcomes)}))

    def worker_connected(self, worker: str) -> None:
        self.fn(ProgressEvent("worker_connected", {"worker": worker}))

    def worker_disconnected(self, worker: str, reason: str) -> None:
        self.fn(ProgressEvent("worker_disconnected", {"worker": worker, "reason": reason}))

    def policy_refused(self, worker: str, reason: str) -> None:
        self.fn(ProgressEvent("policy_refused", {"worker": worker, "reason": reason}))

    def connection_refused(self, peer: str, reason: str, *, auth: bool = False) -> None:
        self.fn(ProgressEvent("connection_refused", {"peer": peer, "reason": reason, "auth": auth}))


def run_observers(
    config: JobConfig, display: Progress, *, announce: Callable[[str], None] | None = None
) -> ProgressGroup:
    """The observers ``config`` asks for, then ``display``; exporters come first, so a display or callback
    that reads them sees the event already counted. Serving starts here; leaving the group's ``with`` stops it.

    Also writes ``OUTPUT/config.json`` (the validated config: paths, never token contents), which the reports
    show. ``announce`` receives one line per endpoint started (the metrics URL).
    """
    observers: list[Progress] = []
    try:
        if config.metrics is not None:
            from .prometheus import CoordinatorMetrics

            metrics = CoordinatorMetrics(per_worker=config.metrics.per_worker)
            observers.append(metrics)
            host, port = config.metrics.host, config.metrics.port
            try:
                url = metrics.serve(host=host, port=port)
            except OSError as exc:
                raise ConfigError(
                    f"metrics: cannot serve on {host}:{port}: {exc.strerror or exc}; choose another metrics.port"
                ) from exc
            if announce is not None:
                announce(f"metrics: {url}")
        if config.output_options.tensorboard:
            from .tensorboard import TensorBoardWriter, config_text

            observers.append(TensorBoardWriter(config.output / "tensorboard", config=config_text(config)))
    except BaseException:
        for observer in observers:
            observer.__exit__(None, None, None)
        raise
    observers.append(display)
    config.output.mkdir(parents=True, exist_ok=True)
    (config.output / CONFIG_FILE).write_text(
        json.dumps(config.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
    )
    return ProgressGroup(observers)
