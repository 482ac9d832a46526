"""Run the pathological non-IID MNIST job with every synchronous built-in strategy, then report.

    python examples/mnist-noniid/compare.py [--rounds 50] [--out runs/noniid] [--strategies fedavg scaffold ...]

Prepares the shards (examples/prepare_data.py), starts the 10 workers once, runs each strategy against them with
the settings of config.yaml (same seed, so the same workers are sampled each round for every strategy), and
writes ``OUT/compare.png`` and ``OUT/compare.md`` with ``fl-coordinator report``. The server-side settings of the
adaptive optimizers and of FedAvgM come from ``sweep.py`` (see README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers
from fedlink.server.progress import LogProgress

HERE = Path(__file__).resolve().parent
TARGET = 0.95
STRATEGIES: dict[str, dict[str, Any]] = {
    "scaffold": {"name": "scaffold", "server_lr": 1.0},
    "fedavg": {"name": "fedavg"},
    "fedavgm": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.7},
    "fedadam": {"name": "fedadam"},  # eta 0.03 and the other defaults: see sweep.py
    "fedyogi": {"name": "fedyogi"},
    "fedadagrad": {"name": "fedadagrad"},
    "fednova": {"name": "fednova"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.2},
    "krum": {"name": "krum", "num_byzantine": 1},
}


def prepare(out: Path) -> Path:
    """The 10 label-skewed shards and the held-out set under ``out/data``."""
    data = out / "data"
    subprocess.run(
        [sys.executable, str(HERE.parent / "prepare_data.py"), "mnist", "--workers", "10", "--classes-per-worker", "2",
         "--out", str(data)],
        check=True, capture_output=True,
    )
    return data


def rounds_to(history: list[dict[str, Any]], target: float = TARGET) -> int | None:
    return next((h["round"] for h in history if (h.get("accuracy") or 0.0) >= target), None)


def run_jobs(
    settings: Mapping[str, Mapping[str, Any]], *, rounds: int, out: Path, data: Path, quiet: bool = False,
    training: Mapping[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run one job per ``label -> strategy`` against the same 10 worker processes; returns each job's history.

    ``training`` overrides keys of config.yaml's ``training`` section for every job."""
    base = yaml.safe_load((HERE / "config.yaml").read_text())
    base["training"] = {**base["training"], **(training or {})}
    histories: dict[str, list[dict[str, Any]]] = {}
    workers = start_workers([data / f"shard-{i}.npy" for i in range(10)], extra_args=["--threads", "1"])
    try:
        for label, strategy in settings.items():
            config = dict(base, name=f"mnist-noniid-{label}", workers=[w.url for w in workers], rounds=rounds,
                          strategy=dict(strategy), output=str(out / label))
            config["evaluation"] = {"data": str(data / "test.npy"), "every": 1}
            progress = None if quiet else LogProgress()
            history = asyncio.run(Coordinator(parse_config(config), progress=progress).run())
            histories[label] = history
            reached = rounds_to(history)
            print(f"{label}: final accuracy {history[-1]['accuracy']:.4f}, rounds to {TARGET:.0%}: "
                  f"{reached if reached is not None else f'not in {rounds}'}", flush=True)
            with open(out / "summary.jsonl", "a", encoding="utf-8") as summary:
                summary.write(json.dumps({"label": label, "strategy": dict(strategy), "rounds": rounds,
                                          "final_accuracy": history[-1]["accuracy"], "rounds_to_95": reached,
                                          "best_accuracy": max(h["accuracy"] for h in history)}) + "\n")
    finally:
        stop_workers(workers)
    return histories


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/noniid"))
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out)
    run_jobs({name: STRATEGIES[name] for name in args.strategies}, rounds=args.rounds, out=args.out, data=data,
             quiet=True)
    script = Path(sys.executable).with_name("fl-coordinator")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedlink.server"]
    subprocess.run(
        [*command, "report",
         *[str(args.out / n) for n in args.strategies], "--out", str(args.out / "compare.png"),
         "--target", str(TARGET), "--title", "MNIST, 10 workers x 2 classes, 5 per round"],
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
