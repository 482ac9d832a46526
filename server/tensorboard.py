"""TensorBoard events of a run: written live (``output: {dir: ..., tensorboard: true}``) or converted afterwards
(``fl-coordinator report RUN --tensorboard DIR``).

Scalars are keyed by round (the global step): ``accuracy``, ``loss``, ``train_loss``, ``roc_auc``, ``epsilon``,
``time/*`` and ``workers/*``; per-worker panels under ``worker/<id>/*`` (contributed, samples, train_loss,
seconds) for at most ``max_workers`` workers; the config as text. A live writer flushes after every round, so
TensorBoard shows the run while it trains.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlink.telemetry import BoundedLabels

from .progress import Progress

if TYPE_CHECKING:
    from .config import JobConfig

__all__ = ["TensorBoardWriter", "record_scalars", "config_text", "convert_run"]

_TAGS = {
    "seconds": "time/seconds",
    "round_seconds": "time/round_seconds",
    "wall_seconds": "time/wall_seconds",
    "slowest_train_seconds": "time/slowest_train_seconds",
    "aggregation_seconds": "time/aggregation_seconds",
    "workers": "workers/contributed",
    "selected": "workers/selected",
    "samples": "workers/samples",
}
_SKIP = {"round", "rounds"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def record_scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """(tag, value) for each number in a ``metrics.jsonl`` record, plus ``workers/dropped``."""
    scalars = []
    for key, value in record.items():
        number = _number(value)
        if key not in _SKIP and number is not None:
            scalars.append((_TAGS.get(key, key), number))
    dropped = record.get("dropped")
    if isinstance(dropped, dict):
        scalars.append(("workers/dropped", float(len(dropped))))
    return scalars


def config_text(config: "JobConfig") -> str:
    """The config as TensorBoard text (markdown: a code block keeps the indentation)."""
    body = json.dumps(config.model_dump(mode="json"), indent=2)
    return "\n".join("    " + line for line in body.splitlines())


class TensorBoardWriter(Progress):
    """A :class:`Progress` observer writing TensorBoard events to ``log_dir``."""

    def __init__(self, log_dir: Path, *, config: str | None = None, max_workers: int = 100) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package; only when asked for

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self._config = config
        self._workers = BoundedLabels(max_workers, overflow=None)

    def __exit__(self, *exc: object) -> None:
        self.writer.close()

    def _tag(self, worker: str) -> str | None:
        label = self._workers.admit(worker)
        return None if label is None else "worker/" + (_UNSAFE.sub("_", label)[:64] or "_")

    def run_started(self, name: str, rounds: int, workers: list[str]) -> None:
        if self._config is not None:
            self.writer.add_text("config", self._config, 0)
        self.writer.add_text("run", f"{name}: {rounds} rounds", 0)

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if status in ("done", "dropped"):
            tag = self._tag(worker)
            if tag is not None:
                self.writer.add_scalar(f"{tag}/contributed", 1.0 if status == "done" else 0.0, server_round)

    def stage_finished(self, server_round: int, stage: str, seconds: float, outcomes: Sequence[Any]) -> None:
        self.writer.add_scalar(f"time/stage_{_UNSAFE.sub('_', stage)[:32]}", seconds, server_round)
        for outcome in outcomes:
            self.worker_record({
                "round": server_round,
                "worker": str(getattr(outcome, "worker", "")),
                "stage": getattr(outcome, "stage", stage),
                "status": getattr(outcome, "status", ""),
                "samples": getattr(outcome, "num_samples", None),
                "seconds": getattr(outcome, "seconds", getattr(outcome, "train_seconds", None)),
                "metrics": getattr(outcome, "metrics", {}),
            }, contributed=False)

    def worker_record(self, record: dict[str, Any], *, contributed: bool = True) -> None:
        """One worker's part in one round (a ``workers.jsonl`` line) as its panel's scalars."""
        tag = self._tag(str(record.get("worker", "")))
        if tag is None:
            return
        step = int(record["round"])
        stage = str(record.get("stage") or "train")
        prefix = "" if stage == "train" else _UNSAFE.sub("_", stage)[:32] + "_"  # e.g. evaluate_samples
        if contributed and stage == "train":
            self.writer.add_scalar(f"{tag}/contributed", 1.0 if record.get("status") == "ok" else 0.0, step)
        for key in ("samples", "seconds"):
            number = _number(record.get(key))
            if number is not None:
                self.writer.add_scalar(f"{tag}/{prefix}{key}", number, step)
        metrics = record.get("metrics")
        if isinstance(metrics, dict):
            for key, value in metrics.items():
                number = _number(value)
                if number is not None:
                    self.writer.add_scalar(f"{tag}/{prefix or 'train_'}{_UNSAFE.sub('_', str(key))[:32]}", number, step)

    def round_finished(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for tag, value in record_scalars(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()


def convert_run(folder: Path, log_dir: Path) -> int:
    """Write the finished (or interrupted) run in ``folder`` as TensorBoard events in ``log_dir``; returns the
    number of rounds written."""
    from .report import load_run
    from .runlog import load_config_json, load_worker_records

    run = load_run(folder)
    config = load_config_json(folder)
    writer = TensorBoardWriter(
        log_dir,
        config="\n".join("    " + line for line in json.dumps(config, indent=2).splitlines()) if config else None,
    )
    with writer:
        writer.run_started(run.name, int(run.records[-1].get("rounds", len(run.records))), [])
        for record in load_worker_records(folder):
            writer.worker_record(record)
        for record in run.records:
            writer.round_finished(record)
    return len(run.records)
