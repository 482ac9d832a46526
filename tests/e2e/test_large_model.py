"""A 200 MB model through a whole round: far past websockets' 1 MiB default message size."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers


def test_200_mb_state_goes_through_a_round(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    workers = start_workers(shards[:2], extra_args=["--threads", "1"])
    try:
        config = parse_config(
            {
                "name": "large",
                "model": {"factory": "fedlink.models:sized_mlp", "kwargs": {"megabytes": 200.0}},
                "workers": [w.url for w in workers],
                "rounds": 1,
                "sampling": {"min_workers": 2},
                "training": {"max_steps": 1, "batch_size": 16, "optimizer": {"lr": 0.01}},
                "output": str(tmp_path / "run"),
            }
        )
        coordinator = Coordinator(config)
        start = {k: v.clone() for k, v in coordinator.state.items()}
        history = asyncio.run(coordinator.run())
    finally:
        stop_workers(workers)
    assert history[0]["workers"] == 2
    size = sum(t.nbytes for t in start.values())
    assert size >= 200 * 2**20 * 0.98
    final = load_file(tmp_path / "run" / "model.safetensors")
    assert final.keys() == start.keys()
    assert any(not torch.equal(final[k], start[k]) for k in start), "one SGD step moved the weights"
