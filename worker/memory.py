"""What a worker remembers between requests: a per-run store across rounds and a per-round context.

The per-run store holds what a technique must carry from one round to the next (error-feedback residuals,
SCAFFOLD control variates, a privacy accountant), keyed by the coordinator's run id. The per-round context holds
what the stages of one round share (secure aggregation's keys), and is dropped when the coordinator says the
round ended, when a later round of the same run begins, or when it has not been touched for ``round_ttl``
seconds. Both live in memory only: a restarted worker starts empty, and says so when a run it does not know asks
for its state (see :meth:`WorkerMemory.run`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WorkerMemory", "RunStore"]

log = logging.getLogger("fedlink.worker")


@dataclass
class RunStore:
    """One run's state on this worker; ``fresh`` is True until the first round of the run used it."""

    run_id: str
    data: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True


@dataclass
class _RoundContext:
    data: dict[str, Any]
    touched: float


class WorkerMemory:
    """Bounded: at most ``max_runs`` runs (least recently used dropped first) and their current rounds."""

    def __init__(self, *, max_runs: int = 8, round_ttl: float = 3600.0) -> None:
        self.max_runs = max_runs
        self.round_ttl = round_ttl
        self._runs: OrderedDict[str, RunStore] = OrderedDict()
        self._rounds: dict[tuple[str, int], _RoundContext] = {}
        #: The frozen parameters of the last global state a coordinator sent (TrainRequest.cache): (run, key, state).
        #: One slot, whatever the number of runs; the tensors are those of the model that trained on them.
        self.global_state: tuple[str, str, dict[str, Any]] | None = None

    def cached_state(self, run_id: str, key: str) -> dict[str, Any] | None:
        """The kept global state if it is ``key`` of ``run_id``, else None (never kept, replaced, or restarted)."""
        kept = self.global_state
        return kept[2] if kept is not None and kept[0] == run_id and kept[1] == key else None

    def run(self, run_id: str) -> RunStore:
        store = self._runs.get(run_id)
        if store is None:
            store = self._runs[run_id] = RunStore(run_id)
            while len(self._runs) > self.max_runs:
                dropped, _ = self._runs.popitem(last=False)
                self._drop_rounds(dropped)
                log.info("forgot the state of run %r (more than %d runs)", dropped, self.max_runs)
        self._runs.move_to_end(run_id)
        return store

    def round(self, run_id: str, server_round: int) -> dict[str, Any]:
        """The context of ``server_round``; opening a round drops the run's earlier rounds."""
        self._expire()
        key = (run_id, server_round)
        context = self._rounds.get(key)
        if context is None:
            for other in [k for k in self._rounds if k[0] == run_id and k[1] != server_round]:
                del self._rounds[other]
            context = self._rounds[key] = _RoundContext({}, time.monotonic())
        context.touched = time.monotonic()
        return context.data

    def end_round(self, run_id: str, server_round: int) -> None:
        self._rounds.pop((run_id, server_round), None)

    def open_rounds(self) -> list[tuple[str, int]]:
        self._expire()
        return sorted(self._rounds)

    def _drop_rounds(self, run_id: str) -> None:
        for key in [k for k in self._rounds if k[0] == run_id]:
            del self._rounds[key]

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.round_ttl
        for key in [k for k, c in self._rounds.items() if c.touched < cutoff]:
            del self._rounds[key]
