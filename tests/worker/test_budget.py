"""Model building within the worker's limits: refused while being built, before any real allocation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedlink.factory import ModelAllowList
from fedlink.models import mlp
from fedlink.protocol.messages import ModelSpec
from fedlink.shards import load_shard
from fedlink.training import TrainingCancelled
from fedlink.worker.budget import MAX_KWARGS_BYTES, ModelTooLarge, build_budget, check_kwargs
from fedlink.worker.service import WorkerService


def test_a_deep_model_is_refused_after_building_only_what_fits() -> None:
    built: list[int] = []
    with pytest.raises(ModelTooLarge, match="--max-state-mb"):
        with build_budget(max_state_bytes=1 << 20, max_tensors=100_000), torch.device("meta"):
            built.append(len(mlp(depth=100_000)))
    assert not built


def test_limits_apply_only_in_the_thread_that_set_them() -> None:
    with build_budget(max_state_bytes=1, max_tensors=1):
        done: list[int] = []
        thread = threading.Thread(target=lambda: done.append(len(mlp(depth=2))))
        thread.start()
        thread.join()
    assert done == [6]


def test_a_stopped_job_stops_building() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingCancelled):
        with build_budget(max_state_bytes=1 << 30, max_tensors=100_000, stop=stop), torch.device("meta"):
            mlp(depth=10)


def test_kwargs_documents_are_bounded() -> None:
    check_kwargs({"depth": 1})
    with pytest.raises(ModelTooLarge, match="kwargs"):
        check_kwargs({"names": "x" * MAX_KWARGS_BYTES})


def test_the_service_checks_a_model_against_its_state_limit(digit_shards: tuple[list[Path], Path]) -> None:
    service = WorkerService(load_shard(digit_shards[0][0]), allow=ModelAllowList(), max_state_bytes=1 << 20)
    service.check_model(ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64}))
    with pytest.raises(ModelTooLarge, match="1 MiB"):
        service.check_model(ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "depth": 100_000}))
