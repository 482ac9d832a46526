"""What a run leaves behind in its output folder: ``metrics.jsonl`` (one line per round) and the final model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["RunOutput", "write_atomic_model"]


def write_atomic_model(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write safetensors to a temporary file, fsync, rename: a reader never sees half a model.

    The metadata goes in as one JSON string under ``"fedlink"``: safetensors keeps metadata in a hash map whose
    order changes from process to process, and identical runs must write identical bytes.
    """
    tmp = path.with_name(path.name + ".tmp")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(tmp), metadata={"fedlink": json.dumps(dict(metadata), sort_keys=True)})
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunOutput:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metrics_path = folder / "metrics.jsonl"
        self.workers_path = folder / "workers.jsonl"
        self.model_path = folder / "model.safetensors"
        self.checkpoint_dir = folder / "checkpoint"

    def start(self) -> None:
        """Create the folder and begin a fresh ``metrics.jsonl`` (and no stale checkpoint)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("", encoding="utf-8")
        self.workers_path.write_text("", encoding="utf-8")
        if self.checkpoint_dir.exists():
            shutil.rmtree(self.checkpoint_dir)

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` to exactly the checkpointed rounds (a killed run may have logged one more)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in history:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.metrics_path)
        self._restore_workers({int(record["round"]) for record in history})

    def _restore_workers(self, rounds: set[int]) -> None:
        """Keep only the per-worker lines of checkpointed rounds (a killed run may have logged one more)."""
        if not self.workers_path.exists():
            self.workers_path.write_text("", encoding="utf-8")
            return
        kept = []
        for line in self.workers_path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["round"]) in rounds:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        tmp = self.workers_path.with_name(self.workers_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.workers_path)

    def write_workers(self, records: list[dict[str, Any]]) -> None:
        """One line per worker per stage of a round (``workers.jsonl``)."""
        with open(self.workers_path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_round(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_model(self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
        write_atomic_model(self.model_path, state, metadata)
        return self.model_path
