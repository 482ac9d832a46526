"""Reading what a run left beside ``metrics.jsonl``: ``workers.jsonl`` and ``config.json``, both optional.

``workers.jsonl`` has one line per worker per round (``round``, ``worker``, ``stage``, ``status``, ``reason``,
``samples``, ``seconds``, ``metrics``); runs written before it existed simply have none. Everything read here
came from peers or from disk, so it is checked for shape and never trusted to be well-formed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlink.errors import DataError

__all__ = ["WORKERS_FILE", "load_worker_records", "load_config_json"]

WORKERS_FILE = "workers.jsonl"


def load_worker_records(folder: Path) -> list[dict[str, Any]]:
    """Per-worker records of the run in ``folder``, or ``[]`` when it has no ``workers.jsonl``."""
    path = folder / WORKERS_FILE
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("round"), int) or "worker" not in record:
            raise DataError(f"{path}:{number}: a worker record needs an integer 'round' and a 'worker'")
        record["worker"] = str(record["worker"])
        records.append(record)
    return records


def load_config_json(folder: Path) -> dict[str, Any] | None:
    """The run's validated config as written at its start (``config.json``), or None."""
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None
