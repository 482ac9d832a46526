"""Showing a run to the person who started it: a live rich table on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedlink.display import safe

__all__ = ["Progress", "LiveProgress", "LogProgress", "MAX_WORKER_ROWS", "make_progress"]

log = logging.getLogger("fedlink.server")

_STYLES = {
    "connected": "cyan",
    "training": "yellow",
    "uploading": "magenta",
    "done": "green",
    "dropped": "red",
    "idle": "dim",
    "offline": "red",
}


class Progress:
    """Events of a run; the base class ignores them all."""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None: ...

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None: ...

    def round_finished(self, record: dict[str, Any]) -> None: ...

    def stage_finished(self, server_round: int, stage: str, seconds: float, outcomes: Sequence[Any]) -> None: ...

    def worker_connected(self, worker: str) -> None: ...

    def worker_disconnected(self, worker: str, reason: str) -> None: ...

    def policy_refused(self, worker: str, reason: str) -> None: ...

    def connection_refused(self, peer: str, reason: str, *, auth: bool = False) -> None:
        """A connection failed its handshake (``auth``: the peer did not prove it holds the token)."""


class LogProgress(Progress):
    def round_finished(self, record: dict[str, Any]) -> None:
        acc = record.get("accuracy")
        eps = record.get("epsilon")
        log.info(
            "round %d/%s: %d workers, accuracy %s, loss %s, %.2fs%s",
            record["round"], record.get("rounds", "?"), record["workers"],
            f"{acc:.4f}" if acc is not None else "-",
            f"{record['loss']:.4f}" if record.get("loss") is not None else "-",
            record["seconds"],
            f", epsilon {eps:.3f} (delta {record.get('delta', 0):g})" if eps is not None else "",
        )

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if status == "dropped":
            log.warning("round %d: worker %s dropped: %s", server_round, safe(worker), safe(detail))


#: Up to this many workers the live display draws one row each; past it, a summary (see ``LiveProgress``).
MAX_WORKER_ROWS = 24
#: Workers still busy the longest, and the latest failures, shown in the summary.
_SUMMARY_ROWS = 5
_BUSY = ("training", "uploading")
_FAILED = ("dropped", "offline")


class LiveProgress(Progress):
    """A rich live display: the last rounds, and the workers of this round.

    With more than ``max_rows`` workers (a swarm of a thousand) one row each would scroll the rounds away, so the
    workers become a summary instead: the count per status, the workers busy the longest (with how long), and the
    latest failures (with why). The display is redrawn at a fixed rate from the latest state, never once per event,
    so an event costs a dictionary update however many workers there are.
    """

    def __init__(self, console: Console, *, max_rows: int = MAX_WORKER_ROWS, clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._clock = clock
        self._max_rows = max_rows
        self._name = ""
        self._rounds = 0
        self._round = 0
        # worker -> (status, detail, since when); insertion order is the configured order
        self._workers: dict[str, tuple[str, str, float]] = {}
        self._history: list[dict[str, Any]] = []
        self._live = Live(console=console, refresh_per_second=8, transient=False, get_renderable=self._render)

    def __enter__(self) -> "LiveProgress":
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.refresh()
        self._live.__exit__(None, None, None)

    def _set(self, worker: str, status: str, detail: str) -> None:
        previous = self._workers.get(worker)
        since = previous[2] if previous is not None and previous[0] == status else self._clock()
        self._workers[worker] = (status, detail, since)

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        self._name, self._rounds = name, rounds
        now = self._clock()
        self._workers = {w: ("idle", "", now) for w in workers}

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        self._round = server_round
        self._set(worker, status, detail)

    def round_finished(self, record: dict[str, Any]) -> None:
        self._history.append(record)

    def worker_connected(self, worker: str) -> None:
        """A row per worker id, added when it connects (whichever side dialled); never one per URL."""
        status = self._workers.get(worker, ("", "", 0.0))[0]
        if status in ("", "offline"):
            self._set(worker, "connected", "")

    def worker_disconnected(self, worker: str, reason: str) -> None:
        self._set(worker, "offline", reason)

    def _render(self) -> Group:
        # Names and details may come from peers (a worker's error message): never read as rich markup, and with
        # every control character escaped, so that nothing a peer sends retitles, recolours or breaks the terminal.
        rounds = Table(title=f"fedlink · {escape(safe(self._name))}", expand=False)
        history = list(self._history[-12:])  # copies: the refresh thread reads while the event loop writes
        workers = list(self._workers.items())
        private = any("epsilon" in rec for rec in history)  # the column only for runs with a privacy ledger
        for column in ("round", "workers", "accuracy", "loss", "seconds", *(("epsilon",) if private else ())):
            rounds.add_column(column, justify="right")
        for rec in history:
            acc = rec.get("accuracy")
            eps = rec.get("epsilon")
            rounds.add_row(
                f"{rec['round']}/{self._rounds}", str(rec["workers"]),
                f"{acc:.2%}" if acc is not None else "-",
                f"{rec['loss']:.4f}" if rec.get("loss") is not None else "-",
                f"{rec['seconds']:.2f}",
                *((f"{eps:.3f}" if eps is not None else "-",) if private else ()),
            )
        if len(workers) <= self._max_rows:
            return Group(rounds, self._worker_rows(workers))
        return Group(rounds, *self._worker_summary(workers))

    def _worker_rows(self, workers: list[tuple[str, tuple[str, str, float]]]) -> Table:
        table = Table(title=f"round {self._round}", expand=False)
        table.add_column("worker")
        table.add_column("status")
        table.add_column("detail", overflow="fold", max_width=70)
        for name, (status, detail, _) in workers:
            table.add_row(Text(safe(name)), Text(safe(status), style=_STYLES.get(status, "")), Text(safe(detail)))
        return table

    def _worker_summary(self, workers: list[tuple[str, tuple[str, str, float]]]) -> list[Table]:
        counts: dict[str, int] = {}
        for _, (status, _, _) in workers:
            counts[status] = counts.get(status, 0) + 1
        totals = Table(title=f"round {self._round}: {len(workers)} workers", expand=False)
        for status in counts:
            totals.add_column(Text(safe(status), style=_STYLES.get(status, "")), justify="right")
        totals.add_row(*(str(n) for n in counts.values()))
        now = self._clock()
        busy = sorted((w for w in workers if w[1][0] in _BUSY), key=lambda w: w[1][2])[:_SUMMARY_ROWS]
        slowest = Table(title="busy the longest", expand=False)
        for column in ("worker", "status", "for"):
            slowest.add_column(column)
        for name, (status, _, since) in busy:
            slowest.add_row(Text(safe(name)), Text(safe(status), style=_STYLES.get(status, "")), f"{now - since:.1f} s")
        all_failed = [w for w in workers if w[1][0] in _FAILED]
        failed = sorted(all_failed, key=lambda w: -w[1][2])[:_SUMMARY_ROWS]
        failures = Table(title=f"failed: {len(all_failed)}, the latest {len(failed)}", expand=False)
        for column in ("worker", "status", "why"):
            failures.add_column(column, overflow="fold", max_width=70 if column == "why" else None)
        for name, (status, detail, _) in failed:
            failures.add_row(Text(safe(name)), Text(safe(status), style=_STYLES.get(status, "")), Text(safe(detail)))
        return [totals, *((slowest,) if busy else ()), *((failures,) if failed else ())]


def make_progress(console: Console | None = None) -> Progress:
    console = console or Console(stderr=True)
    return LiveProgress(console) if console.is_terminal else LogProgress()
