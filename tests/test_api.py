"""The Python API's edges: config forms, the running-loop guard, typed records, workers stopped on errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import fedlink
from fedlink.errors import FedlinkError
from fedlink.server.config import JobConfig
from fedlink.server.errors import ConfigError


def test_round_records_keep_fields_they_do_not_know() -> None:
    record = fedlink.RoundRecord.model_validate({"round": 3, "accuracy": 0.9, "workers": 2, "secagg_survivors": 5})
    assert record.round == 3 and record.accuracy == 0.9 and record.dropped == {}
    assert record.model_extra == {"secagg_survivors": 5}


def test_config_forms_are_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rounds"):
        fedlink.train({"name": "x", "model": {"factory": "fedlink.models:mlp"}, "workers": ["ws://127.0.0.1:1"]})
    with pytest.raises(ConfigError, match="cannot read config"):
        fedlink.train(tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="path, a mapping or a JobConfig"):
        fedlink.train(42)  # type: ignore[arg-type]
    assert fedlink.JobConfig is JobConfig


def test_train_inside_a_running_loop_says_what_to_use_instead() -> None:
    async def inside() -> None:
        fedlink.train({"name": "x"})

    with pytest.raises(RuntimeError, match="await fedlink.train_async"):
        asyncio.run(inside())


def test_local_workers_are_stopped_when_the_block_fails(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, _ = digit_shards
    workers = fedlink.LocalWorkers(shards[:2], args=["--threads", "1"], log_dir=tmp_path / "logs")
    with pytest.raises(KeyError):
        with workers:
            processes = [w.process for w in workers.workers]
            assert len(workers.urls) == 2 and all(u.startswith("ws://127.0.0.1:") for u in workers.urls)
            raise KeyError("the notebook cell failed")
    assert [p.returncode for p in processes] == [0, 0], "stopped cleanly (SIGTERM), not left running"
    assert workers.workers == []
    with pytest.raises(FedlinkError, match="already started"):
        with workers:
            workers.start()
