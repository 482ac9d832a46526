"""``fl-coordinator simulate`` end to end: real host processes (and Ray actors), the real coordinator and engine.

The short CI version runs scikit-learn's digits over 20 virtual workers; the acceptance run (MNIST, 100 virtual
workers, 30 rounds, ``-m slow``) checks the same property at full size: one model, bit for bit, whatever runs it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import fedlink
from fedlink.datasets import load_digits, load_mnist
from fedlink.server.cli import main
from fedlink.server.config import parse_config
from fedlink.server.progress import Progress
from fedlink.server.simulation.hosts import LocalBackend
from fedlink.server.simulation.run import simulate_async
from fedlink.shards import save_shard


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    x, y = load_digits()
    save_shard(folder / "train.npy", x[:1500], y[:1500])
    save_shard(folder / "test.npy", x[1500:], y[1500:])
    return folder


def digits_job(folder: Path, out: str, **simulation: Any) -> dict[str, Any]:
    return {
        "name": "sim-digits",
        "seed": 0,
        "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}},
        "rounds": 3,
        "sampling": {"fraction": 0.25, "min_workers": 2},
        "training": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.1}},
        "evaluation": {"data": str(folder / "test.npy")},
        "output": str(folder / out),
        "simulation": {"data": str(folder / "train.npy"), "workers": 20, "partition": {"dirichlet": 0.5}, **simulation},
    }


@pytest.fixture(scope="module")
def one_process(digits: Path) -> bytes:
    """The model of the CLI run with one host process: what every other way of running it must reproduce."""
    (digits / "one.yaml").write_text(yaml.safe_dump(digits_job(digits, "one", processes=1)))
    result = CliRunner().invoke(main, ["simulate", str(digits / "one.yaml")])
    assert result.exit_code == 0, result.output
    assert "finished 3 rounds; final accuracy" in result.output and "client updates per second" in result.output
    return (digits / "one" / "model.safetensors").read_bytes()


def test_cli_with_one_process_and_api_with_two_give_the_same_model(digits: Path, one_process: bytes) -> None:
    history = fedlink.simulate(digits_job(digits, "two", processes=2), progress=Progress())
    assert len(history) == 3
    assert (digits / "two" / "model.safetensors").read_bytes() == one_process
    assert all(r.workers == r.selected == 5 for r in history)
    assert all((r.model_extra or {})["client_updates_per_second"] > 0 for r in history)
    workers = [json.loads(line) for line in (digits / "two" / "workers.jsonl").read_text().splitlines()]
    assert {w["worker"] for w in workers} <= {f"sim-{i}" for i in range(20)} and len(workers) == 15


class KillHostZero(Progress):
    """Kills host process 0 as round 2's requests go out: its virtual workers must be served by host 1."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.killed = False

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if server_round == 2 and status == "training" and not self.killed:
            self.killed = True
            self.backend.processes[0].kill()


async def test_a_failed_host_is_reported_and_its_virtual_workers_are_asked_again_elsewhere(
    digits: Path, one_process: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    backend = LocalBackend()
    progress = KillHostZero(backend)
    with caplog.at_level(logging.WARNING, logger="fedlink.server"):
        history = await simulate_async(
            parse_config(digits_job(digits, "failed", processes=2)), progress=progress, backend=backend
        )
    assert progress.killed
    assert any("simulation host 0 failed" in r.getMessage() and "exited with status" in r.getMessage() for r in caplog.records)
    assert all(r["workers"] == r["selected"] for r in history), "no virtual worker was lost with its host"
    assert (digits / "failed" / "model.safetensors").read_bytes() == one_process


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'fedlink[ray]')")
def test_ray_backend_with_two_actors_gives_the_same_model(digits: Path, one_process: bytes) -> None:
    history = fedlink.simulate(digits_job(digits, "ray", processes=2, backend="ray"), progress=Progress())
    assert len(history) == 3
    assert (digits / "ray" / "model.safetensors").read_bytes() == one_process


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_mnist_100_virtual_workers_30_rounds_same_model_any_way_it_runs(
    shared_data: Path, tmp_path: Path, backend: str
) -> None:
    """The acceptance run: MNIST's 8,000 training images, Dirichlet 0.5 over 100 virtual workers, 10 a round."""
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'fedlink[ray]')")
    x, y = load_mnist(shared_data / "mnist")
    save_shard(tmp_path / "train.npy", x[:8000], y[:8000])
    save_shard(tmp_path / "test.npy", x[8000:], y[8000:])

    def job(out: str, **simulation: Any) -> dict[str, Any]:
        return {
            "name": "sim-mnist", "seed": 0, "model": {"factory": "fedlink.models:mnist_cnn"}, "rounds": 30,
            "sampling": {"fraction": 0.1, "min_workers": 10},
            "training": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}},
            "evaluation": {"data": str(tmp_path / "test.npy"), "every": 10}, "output": str(tmp_path / out),
            "simulation": {"data": str(tmp_path / "train.npy"), "workers": 100, "partition": {"dirichlet": 0.5},
                           **simulation},
        }

    runs = [("one", {"processes": 1}), ("two", {"processes": 2})] if backend == "local" else [
        ("one", {"processes": 1}), ("ray", {"processes": 2, "backend": "ray"})
    ]
    histories = [fedlink.simulate(job(out, **simulation), progress=Progress()) for out, simulation in runs]
    models = [(tmp_path / out / "model.safetensors").read_bytes() for out, _ in runs]
    assert models[0] == models[1]
    final = histories[0][-1].accuracy
    assert final is not None and final > 0.65, f"final accuracy {final}"  # measured: 0.7015


async def test_virtual_workers_compress_as_their_host_offers(digits: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Virtual workers have no hello of their own: the scheme is granted by what their host process offered."""
    job = digits_job(digits, "int8", processes=1)
    job["training"] = {**job["training"], "update": "delta", "compression": {"name": "int8"}, "download": "float16"}
    with caplog.at_level(logging.WARNING, logger="fedlink.server"):
        history = await simulate_async(parse_config(job), progress=Progress())
    assert not [r for r in caplog.records if "does not offer" in r.getMessage()]
    workers = [json.loads(line) for line in (digits / "int8" / "workers.jsonl").read_text().splitlines()]
    dense = 64 * 32 + 32 + 32 * 10 + 10  # float32 values of the MLP
    assert {w["upload_bytes"] for w in workers} == {dense + 4 * 4}  # int8 values, one float32 scale per tensor
    assert {w["download_bytes"] for w in workers} == {dense * 2}
    assert len(history) == 3 and all(r["workers"] == 5 for r in history)
