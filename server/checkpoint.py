"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

After each completed round the coordinator writes ``OUTPUT/checkpoint/round-NNNN/`` (global model and strategy
tensors as safetensors, everything else as JSON), renames it into place, fsyncs, then points ``LATEST`` at it with
an atomic rename. A coordinator killed at any moment leaves either the previous checkpoint or the new one, never
half of one. Every random choice of a round derives from the run's seed and the round number, so the model, the
strategy state and the metrics so far are the whole state of a run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlink.protocol.tensors import State

from .errors import ConfigError

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "flatten_tensors", "unflatten_tensors"]

_FORMAT = 1


@dataclass
class Checkpoint:
    server_round: int
    state: State
    strategy: dict[str, Any]
    history: list[dict[str, Any]]
    fingerprint: str


def flatten_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON (tensors replaced by ``{"__tensor__": key}``) and a flat tensor dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path or '/'}")

    return walk(obj, prefix), tensors


def unflatten_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {k: unflatten_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_tensors(v, tensors) for v in skeleton]
    return skeleton


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{checkpoint.server_round:04d}"
    tmp = folder / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in checkpoint.state.items()}, str(tmp / "model.safetensors"))
    skeleton, tensors = flatten_tensors(checkpoint.strategy)
    save_file(tensors, str(tmp / "strategy.safetensors"))
    meta = {
        "format": _FORMAT,
        "round": checkpoint.server_round,
        "fingerprint": checkpoint.fingerprint,
        "strategy": skeleton,
        "history": checkpoint.history,
    }
    (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for child in tmp.iterdir():
        _fsync_file(child)
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    latest = folder / "LATEST.tmp"
    latest.write_text(name + "\n", encoding="utf-8")
    _fsync_file(latest)
    os.replace(latest, folder / "LATEST")
    _fsync_dir(folder)
    for old in folder.glob("round-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The last completed checkpoint in ``folder``, or None when there is none."""
    pointer = folder / "LATEST"
    if not pointer.exists():
        return None
    where = folder / pointer.read_text(encoding="utf-8").strip()
    try:
        meta = json.loads((where / "checkpoint.json").read_text(encoding="utf-8"))
        state = load_file(str(where / "model.safetensors"))
        tensors = load_file(str(where / "strategy.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"checkpoint {where} is unreadable: {exc}") from exc
    if meta.get("format") != _FORMAT:
        raise ConfigError(f"checkpoint {where} has format {meta.get('format')!r}, this fedlink reads {_FORMAT}")
    return Checkpoint(
        server_round=int(meta["round"]),
        state=state,
        strategy=unflatten_tensors(meta["strategy"], tensors),
        history=list(meta["history"]),
        fingerprint=str(meta["fingerprint"]),
    )
