"""Run the pathological non-IID MNIST job with FedAvg, FedProx, FedAvgM, FedAdam and FedYogi, then report.

    python examples/mnist-noniid/compare.py [--rounds 50] [--out runs/noniid]

Prepares the shards (examples/prepare_data.py), starts the 10 workers once, runs each strategy against them with
the settings of config.yaml (same seed, so the same workers are sampled each round for every strategy), and
writes ``OUT/compare.png`` and ``OUT/compare.md`` with ``fl-coordinator report``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import yaml

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers
from fedlink.server.progress import LogProgress

HERE = Path(__file__).resolve().parent
STRATEGIES = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedavgm": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.7},
    "fedadam": {"name": "fedadam", "eta": 0.003, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"name": "fedyogi", "eta": 0.003, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/noniid"))
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    args = parser.parse_args()
    data = args.out / "data"
    subprocess.run(
        [sys.executable, str(HERE.parent / "prepare_data.py"), "mnist", "--workers", "10", "--classes-per-worker", "2", "--out", str(data)],
        check=True,
    )
    base = yaml.safe_load((HERE / "config.yaml").read_text())
    workers = start_workers([data / f"shard-{i}.npy" for i in range(10)], extra_args=["--threads", "1"])
    try:
        for name in args.strategies:
            config = dict(base, name=f"mnist-noniid-{name}", workers=[w.url for w in workers], rounds=args.rounds,
                          strategy=STRATEGIES[name], output=str(args.out / name))
            config["evaluation"] = {"data": str(data / "test.npy"), "every": 1}
            history = asyncio.run(Coordinator(parse_config(config), progress=LogProgress()).run())
            print(f"{name}: final accuracy {history[-1]['accuracy']:.4f}", flush=True)
    finally:
        stop_workers(workers)
    subprocess.run(
        ["fl-coordinator", "report", *[str(args.out / n) for n in args.strategies], "--out", str(args.out / "compare.png"),
         "--target", "0.95", "--title", "MNIST, 10 workers x 2 classes, 5 per round"],
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
