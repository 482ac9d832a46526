"""Showing a run to the person who started it: a live rich table on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedlink.display import safe

__all__ = ["Progress", "LiveProgress", "LogProgress", "make_progress"]

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


class LiveProgress(Progress):
    def __init__(self, console: Console) -> None:
        self._console = console
        self._live = Live(console=console, refresh_per_second=8, transient=False)
        self._name = ""
        self._rounds = 0
        self._round = 0
        self._workers: dict[str, tuple[str, str]] = {}
        self._history: list[dict[str, Any]] = []

    def __enter__(self) -> "LiveProgress":
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self._render(), refresh=True)
        self._live.__exit__(None, None, None)

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        self._name, self._rounds = name, rounds
        self._workers = {w: ("idle", "") for w in workers}
        self._live.update(self._render())

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        self._round = server_round
        self._workers[worker] = (status, detail)
        self._live.update(self._render())

    def round_finished(self, record: dict[str, Any]) -> None:
        self._history.append(record)
        self._live.update(self._render())

    def worker_connected(self, worker: str) -> None:
        """A row per worker id, added when it connects (whichever side dialled); never one per URL."""
        status, detail = self._workers.get(worker, ("", ""))
        self._workers[worker] = ("connected", "") if status in ("", "offline") else (status, detail)
        self._live.update(self._render())

    def worker_disconnected(self, worker: str, reason: str) -> None:
        self._workers[worker] = ("offline", reason)
        self._live.update(self._render())

    def _render(self) -> Group:
        # Names and details may come from peers (a worker's error message): never read as rich markup, and with
        # every control character escaped, so that nothing a peer sends retitles, recolours or breaks the terminal.
        rounds = Table(title=f"fedlink · {escape(safe(self._name))}", expand=False)
        private = any("epsilon" in rec for rec in self._history)  # the column only for runs with a privacy ledger
        for column in ("round", "workers", "accuracy", "loss", "seconds", *(("epsilon",) if private else ())):
            rounds.add_column(column, justify="right")
        for rec in self._history[-12:]:
            acc = rec.get("accuracy")
            eps = rec.get("epsilon")
            rounds.add_row(
                f"{rec['round']}/{self._rounds}", str(rec["workers"]),
                f"{acc:.2%}" if acc is not None else "-",
                f"{rec['loss']:.4f}" if rec.get("loss") is not None else "-",
                f"{rec['seconds']:.2f}",
                *((f"{eps:.3f}" if eps is not None else "-",) if private else ()),
            )
        workers = Table(title=f"round {self._round}", expand=False)
        workers.add_column("worker")
        workers.add_column("status")
        workers.add_column("detail", overflow="fold", max_width=70)
        for name, (status, detail) in self._workers.items():
            workers.add_row(Text(safe(name)), Text(safe(status), style=_STYLES.get(status, "")), Text(safe(detail)))
        return Group(rounds, workers)


def make_progress(console: Console | None = None) -> Progress:
    console = console or Console(stderr=True)
    return LiveProgress(console) if console.is_terminal else LogProgress()
