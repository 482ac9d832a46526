"""The ``simulation:`` section: the forms users write, and the errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedlink.server.config import parse_config
from fedlink.server.errors import ConfigError
from fedlink.server.simulation.config import PartitionConfig, SimulationConfig


def job(**simulation: Any) -> dict[str, Any]:
    return {
        "name": "sim",
        "model": {"factory": "fedlink.models:mlp"},
        "rounds": 2,
        "simulation": {"data": "train.npy", "workers": 10, **simulation},
    }


@pytest.mark.parametrize(
    ("given", "kind", "value"),
    [
        ("iid", "iid", 0.0),
        ({"iid": None}, "iid", 0.0),
        ({"dirichlet": 0.5}, "dirichlet", 0.5),
        ({"classes_per_worker": 2}, "classes_per_worker", 2.0),
        ({"quantity": 1}, "quantity", 1.0),
    ],
)
def test_partition_forms(given: Any, kind: str, value: float) -> None:
    partition = PartitionConfig.model_validate(given)
    assert (partition.kind, partition.value) == (kind, value)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"dirichlet": 0}, "alpha > 0"),
        ({"dirichlet": "a lot"}, "takes a number"),
        ({"classes_per_worker": 1.5}, "whole number"),
        ({"zipf": 1.0}, "unknown partition 'zipf'"),
        ({"iid": None, "dirichlet": 0.5}, "name one partition"),
    ],
)
def test_partition_errors_name_the_problem(given: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(job(partition=given))


def test_a_simulation_needs_no_workers_and_refuses_real_ones() -> None:
    config = parse_config(job(processes=2), base=Path("/jobs"))
    assert config.simulation is not None and config.simulation.data == Path("/jobs/train.npy")
    assert config.simulation.policy.min_batch_size == 1, "small virtual shards pass the default policy"
    with pytest.raises(ConfigError, match="virtual"):
        parse_config({**job(), "workers": ["ws://127.0.0.1:8777"]})
    with pytest.raises(ConfigError, match="simulation.workers is 10"):
        parse_config({**job(), "sampling": {"min_workers": 11}})
    with pytest.raises(ConfigError, match="ray_address needs backend: ray"):
        parse_config(job(ray_address="auto"))


def test_how_a_simulation_runs_does_not_change_its_fingerprint_but_its_data_does() -> None:
    """Processes, backend and resources do not change the model, so a run may resume with others."""
    base = parse_config(job()).fingerprint()
    assert parse_config(job(processes=4, backend="ray", resources={"cpus": 2})).fingerprint() == base
    assert parse_config(job(partition={"dirichlet": 0.5})).fingerprint() != base
    assert parse_config(job(workers=11)).fingerprint() != base


def test_resources_give_whole_threads() -> None:
    assert SimulationConfig.model_validate({"data": "x.npy", "workers": 1, "resources": {"cpus": 0.5}}).resources.threads == 1
    assert SimulationConfig.model_validate({"data": "x.npy", "workers": 1, "resources": {"cpus": 3}}).resources.threads == 3
