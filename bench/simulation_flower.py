"""Flower's side of bench/simulation.py: the same job on Flower's simulation engine (``flwr.simulation``).

Runs in Flower's own virtual environment (it never imports fedlink): the model is read from fedlink's
``common/models.py`` by path, the data and the partition from the files bench/simulation.py wrote (plain
numpy arrays, loaded without pickle). Writes one JSON object of figures to ``--out``.

    /tmp/flwr-sim-venv/bin/python bench/simulation_flower.py --data D/train.npy --partition D/partition.npz ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, FitIns, FitRes, Parameters, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--partition", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True, help="fedlink's common/models.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--cpus", type=float, default=1.0, help="per client (Flower's default is 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("fedlink_models", args.models)
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    records = np.load(args.data, allow_pickle=False)
    x, y = np.ascontiguousarray(records["x"]), np.ascontiguousarray(records["y"]).astype(np.int64)
    with np.load(args.partition, allow_pickle=False) as archive:
        offsets, indices = archive["offsets"], archive["indices"]
    workers = offsets.size - 1

    torch.manual_seed(args.seed)
    initial = [v.detach().numpy() for v in models.mnist_cnn().state_dict().values()]
    times: dict[str, Any] = {"first": None, "last": None, "updates": 0}

    class Timed(FedAvg):
        def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
            if times["first"] is None:
                times["first"] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)  # type: ignore[no-any-return]

        def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: Any) -> Any:
            aggregated = super().aggregate_fit(server_round, results, failures)
            times["last"] = time.perf_counter()
            times["updates"] += len(results)
            return aggregated

    class Client(NumPyClient):
        def __init__(self, partition: int) -> None:
            rows = indices[offsets[partition]:offsets[partition + 1]]
            self.x, self.y = torch.tensor(x[rows]), torch.tensor(y[rows])
            self.seed = partition

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            torch.set_num_threads(max(1, int(args.cpus)))
            model = models.mnist_cnn()
            model.load_state_dict({k: torch.tensor(v) for k, v in zip(model.state_dict(), parameters)})
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
            generator = torch.Generator().manual_seed(self.seed)
            model.train()
            for _ in range(args.epochs):
                order = torch.randperm(len(self.y), generator=generator)
                for start in range(0, len(order), args.batch_size):
                    batch = order[start:start + args.batch_size]
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(self.x[batch].float()), self.y[batch])
                    loss.backward()
                    optimizer.step()
            return [v.detach().numpy() for v in model.state_dict().values()], len(self.y), {}

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        per_round = max(1, int(round(args.fraction * workers)))
        strategy = Timed(
            fraction_fit=args.fraction, fraction_evaluate=0.0, min_fit_clients=per_round, min_evaluate_clients=0,
            min_available_clients=workers, initial_parameters=ndarrays_to_parameters(initial),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    started = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn), num_supernodes=workers,
        backend_config={"client_resources": {"num_cpus": args.cpus, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - started
    seconds = (times["last"] or 0.0) - (times["first"] or 0.0)
    args.out.write_text(json.dumps({"updates": times["updates"], "round_seconds": seconds, "wall_seconds": wall}))


if __name__ == "__main__":
    main()
