"""Run folders as a coordinator leaves them (metrics.jsonl, workers.jsonl, config.json), for the report tests.

Worker ids and drop reasons are chosen hostile: they are peer-supplied text, and the reports must escape them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["HOSTILE_WORKER", "HOSTILE_REASON", "write_run"]

HOSTILE_WORKER = '<script>document.title="pwned"</script>'
HOSTILE_REASON = '<img src=x onerror="document.title=\'pwned\'"> missed the round deadline'


def write_run(
    folder: Path, *, rounds: int = 8, epsilon: bool = True, workers_file: bool = True, drop_round: int = 3,
    pace: float = 2.0,
) -> Path:
    """A three-worker run whose accuracy climbs (slower for a larger ``pace``); ``HOSTILE_WORKER`` is dropped in
    ``drop_round``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["site-a", "site-b", HOSTILE_WORKER]
    metrics, workers = [], []
    for r in range(1, rounds + 1):
        dropped = {HOSTILE_WORKER: HOSTILE_REASON} if r == drop_round else {}
        record: dict[str, Any] = {
            "round": r, "rounds": rounds, "accuracy": 0.5 + 0.45 * (1 - math.exp(-r / pace)),
            "loss": 2.0 * math.exp(-r / (0.75 * pace)),
            "workers": 3 - len(dropped), "selected": 3, "samples": 600 - 200 * len(dropped),
            "train_loss": 1.9 * math.exp(-r / pace), "seconds": 1.0 + 0.1 * r, "round_seconds": 0.5 + 0.2 * pace + 0.1 * r,
            "wall_seconds": 1.0 + 0.1 * r, "slowest_train_seconds": 0.5, "dropped": dropped,
        }
        if epsilon:
            record["epsilon"] = 0.4 * r
        metrics.append(record)
        for name in names:
            ok = name not in dropped
            workers.append({
                "round": r, "worker": name, "stage": "train", "status": "ok" if ok else "dropped",
                "reason": "" if ok else dropped[name], "samples": 200 if ok else 0, "seconds": 0.4,
                "metrics": {"loss": record["train_loss"]} if ok else {},
            })
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    if workers_file:
        (folder / "workers.jsonl").write_text("".join(json.dumps(w) + "\n" for w in workers), encoding="utf-8")
    config = {"name": folder.name, "rounds": rounds, "model": {"factory": "fedlink.models:mlp", "kwargs": {}},
              "workers": [{"url": "ws://127.0.0.1:8777", "token_file": None}], "strategy": {"name": "fedavg"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
