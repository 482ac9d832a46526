"""Updates received to disk through the coordinator's real round path: the run is the same to the bit, and the spill
directory is left as it was found."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from .inmemory_jobs import coordinator_for, in_memory_workers

MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}}
FROZEN = {"factory": "fedlink.models:sized_mlp",
          "kwargs": {"megabytes": 0.25, "in_features": 64, "num_classes": 10, "frozen_backbone": True}}


def _config(
    out: Path, *, model: dict[str, Any], update: str, strategy: str, limits: dict[str, Any], compression: str = "none"
) -> dict[str, Any]:
    return {
        "name": "spill", "seed": 5, "model": model, "rounds": 2, "output": str(out),
        "training": {"update": update, "epochs": 2, "optimizer": {"lr": 0.05, "momentum": 0.9},
                     "compression": {"name": compression, "ratio": 0.05, "dense_below": 0}},
        "strategy": {"name": strategy, **({"num_byzantine": 0} if strategy == "krum" else {})},
        **({"sampling": {"min_workers": 3}} if strategy == "krum" else {}),
        "limits": limits,
    }


def _memory_and_disk(spill_dir: Path) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The two runs compared: every update held in memory, and every update received to disk."""
    return ("memory", {"spill_bytes": 1 << 40}), ("disk", {"spill_bytes": 0, "spill_dir": str(spill_dir)})


def _assert_nothing_left(spill_dir: Path) -> None:
    assert os.listdir(spill_dir) == []
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [target for target in fds if target.startswith(str(spill_dir))]  # every spill file was closed


@pytest.mark.parametrize(
    ("model", "update", "strategy", "compression"),
    [
        (MLP, "delta", "fedavg", "none"),
        (MLP, "weights", "median", "none"),  # a robust strategy reads each spilled update's tensors whole
        (FROZEN, "weights", "fedavg", "none"),  # frozen parameters stay out of the fold
        (FROZEN, "delta", "krum", "none"),  # Krum's pick lacks them too: the round keeps them from the global model
        # Compressed updates go to disk as sent, and are decoded from there a slice at a time.
        (MLP, "delta", "fedavg", "int8"),
        (FROZEN, "delta", "fedavg", "topk"),
        (MLP, "delta", "median", "float16"),
    ],
    ids=["fedavg-delta", "median-weights", "frozen-backbone", "frozen-krum", "int8", "frozen-topk", "median-float16"],
)
async def test_a_run_whose_updates_go_to_disk_ends_with_the_same_bits_and_leaves_nothing_behind(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, model: dict[str, Any], update: str, strategy: str,
    compression: str,
) -> None:
    shards, _ = digit_shards
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    runs = {}
    for name, limits in _memory_and_disk(spill_dir):
        config = _config(
            tmp_path / name, model=model, update=update, strategy=strategy, limits=limits, compression=compression
        )
        async with in_memory_workers(shards) as remotes:
            coordinator = coordinator_for(remotes, config)
            history = await coordinator.run()
        runs[name] = (
            coordinator.state,
            [r["train_loss"] for r in history],
            [r["spilled_bytes"] for r in history],
            [r["upload_bytes"] for r in history],
        )
    memory, disk = runs["memory"], runs["disk"]
    assert list(disk[0]) == list(memory[0])
    for key, tensor in memory[0].items():
        assert torch.equal(disk[0][key], tensor), key
    assert disk[1] == memory[1]
    assert memory[2] == [0, 0] and disk[2] == disk[3] == memory[3] and min(disk[2]) > 0  # every update went to disk
    if model is FROZEN:  # left out of every fold, kept to the bit
        from fedlink.server.config import parse_config
        from fedlink.server.coordinator import initial_state

        config = _config(tmp_path / "x", model=model, update=update, strategy="fedavg", limits={})
        initial, _ = initial_state(parse_config({**config, "workers": ["ws://x:1"]}, source="test"))
        assert all(torch.equal(disk[0][name], initial[name]) for name in ("1.weight", "3.weight", "5.bias"))
        assert not torch.equal(disk[0]["7.weight"], initial["7.weight"])
    _assert_nothing_left(spill_dir)


def test_a_spill_directory_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    from fedlink.server.config import parse_config
    from fedlink.server.coordinator import Coordinator
    from fedlink.server.errors import ConfigError

    config = {**_config(tmp_path / "out", model=MLP, update="delta", strategy="fedavg",
                        limits={"spill_dir": str(tmp_path / "nowhere")}), "workers": ["ws://127.0.0.1:1"]}
    with pytest.raises(ConfigError, match="limits.spill_dir .*nowhere.* not a directory"):
        Coordinator(parse_config(config, source="test"))


def test_a_spill_directory_in_memory_gets_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedlink.protocol.spill import memory_backed
    from fedlink.server.config import parse_config
    from fedlink.server.coordinator import Coordinator

    if not os.path.isdir("/dev/shm") or not memory_backed("/dev/shm"):
        pytest.skip("this machine has no tmpfs at /dev/shm")
    for spill_dir, warned in (("/dev/shm", True), (str(tmp_path), False)):
        caplog.clear()
        config = {**_config(tmp_path / "out", model=MLP, update="delta", strategy="fedavg",
                            limits={"spill_dir": spill_dir, "spill_bytes": 0}), "workers": ["ws://127.0.0.1:1"]}
        Coordinator(parse_config(config, source="test"))
        assert ("is in memory (tmpfs)" in caplog.text) is warned, caplog.text


@pytest.mark.parametrize("compression", ["none", "int8"])
async def test_fedbuff_folds_updates_from_disk_to_the_same_bits(
    digit_shards: tuple[list[Path], Path], tmp_path: Path, compression: str
) -> None:
    """Asynchronous training spills as synchronous rounds do. One worker and a buffer of one make the order of
    results fixed, so the run on disk must end with the in-memory run's bits."""
    shards, _ = digit_shards
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    runs = {}
    for name, limits in _memory_and_disk(spill_dir):
        config = {
            **_config(tmp_path / name, model=MLP, update="delta", strategy="fedavg", limits=limits,
                      compression=compression),
            "rounds": 3,
            "strategy": {"name": "fedbuff", "buffer_size": 1},
        }
        async with in_memory_workers(shards[:1]) as remotes:
            coordinator = coordinator_for(remotes, config)
            history = await coordinator.run()
        runs[name] = (coordinator.state, [r["spilled_bytes"] for r in history], [r["upload_bytes"] for r in history])
    memory, disk = runs["memory"], runs["disk"]
    for key, tensor in memory[0].items():
        assert torch.equal(disk[0][key], tensor), key
    assert memory[1] == [0, 0, 0] and disk[1] == disk[2] == memory[2] and min(disk[1]) > 0
    _assert_nothing_left(spill_dir)
