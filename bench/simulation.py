"""Simulation throughput: ``fl-coordinator simulate`` and Flower's simulation engine, side by side, one run.

The same job on both: MNIST's first 8,000 images over 1,000 virtual workers (IID, seed 0: the very same index
arrays, written once and read by both), the small CNN of ``fedlink.models:mnist_cnn`` from the same seeded
initial weights, 100 workers per round, 1 local epoch, batch 32, SGD lr 0.05, 5 rounds, one CPU (one torch
thread) per fedlink host process and per Flower client, ``--processes`` of each at once.

Figures: client updates per second over the rounds (first dispatch to last aggregation), the whole run's wall
time (start-up included), and the peak resident memory of each engine's whole process tree (coordinator,
hosts; Flower's driver, Ray's processes and actors), sampled every 50 ms.

Flower runs in its own virtual environment, so that its pins never touch fedlink's::

    python3.11 -m venv /tmp/flwr-sim-venv
    /tmp/flwr-sim-venv/bin/pip install torch==2.13.0 'flwr[simulation]==1.41.0'
    .venv/bin/python bench/simulation.py --flower-python /tmp/flwr-sim-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from fedlink.datasets import load_mnist, shared_data_dir
from fedlink.server.simulation.config import SimulationConfig
from fedlink.server.simulation.run import PARTITION_FILE, partition_data
from fedlink.shards import save_shard
from fedlink.worker.virtual_host import load_partition, save_partition

ROOT = Path(__file__).resolve().parent.parent


def peak_rss(process: subprocess.Popen[bytes], stop: threading.Event, out: list[int]) -> None:
    """The largest sum of RSS over ``process`` and all its descendants, sampled until ``stop``."""
    try:
        parent = psutil.Process(process.pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        out[0] = max(out[0], total)
        stop.wait(0.05)


def measured(command: list[str], *, cwd: Path) -> tuple[int, float, float]:
    """Run ``command``; returns its exit status, wall seconds and peak tree RSS in MB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd)
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=peak_rss, args=(process, stop, peak), daemon=True)
    watcher.start()
    status = process.wait()
    stop.set()
    watcher.join()
    return status, time.perf_counter() - started, peak[0] / 2**20


def startup(folder: Path, processes: int) -> None:
    """Start-up and memory against the number of virtual workers: 1,000 and 10,000 (10 a round, 2 rounds)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_shard(folder / "wide.npy", rng.normal(size=(20_000, 16)).astype(np.float32), rng.integers(0, 10, 20_000))
    print(f"{'virtual workers':>15} {'start-up s':>10} {'wall s':>7} {'peak MB':>8}")
    for workers in (1_000, 10_000):
        config = {
            "name": f"startup-{workers}", "seed": 0, "rounds": 2,
            "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 16, "hidden": 32, "num_classes": 10}},
            "sampling": {"fraction": 10 / workers, "min_workers": 10}, "output": f"startup-{workers}",
            "simulation": {"data": "wide.npy", "workers": workers, "processes": processes},
        }
        (folder / "startup.yaml").write_text(yaml.safe_dump(config))
        log = folder / f"startup-{workers}.log"
        with log.open("w") as err:
            started = time.perf_counter()
            process = subprocess.Popen(
                [str(ROOT / ".venv/bin/fl-coordinator"), "simulate", "startup.yaml"],
                cwd=folder, stderr=err, stdout=subprocess.DEVNULL,
            )
            stop, peak = threading.Event(), [0]
            watcher = threading.Thread(target=peak_rss, args=(process, stop, peak), daemon=True)
            watcher.start()
            status = process.wait()
            stop.set()
            watcher.join()
            wall = time.perf_counter() - started
        if status != 0:
            sys.exit(f"simulate failed with status {status}; see {log}")
        first = json.loads((folder / f"startup-{workers}" / "metrics.jsonl").read_text().splitlines()[0])
        seconds = first["startup_seconds"]
        print(f"{workers:>15,} {seconds:>10.2f} {wall:>7.1f} {peak[0] / 2**20:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2, help="fedlink host processes; Flower clients at once")
    parser.add_argument("--flower-python", default="/tmp/flwr-sim-venv/bin/python", help="'' skips Flower")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--startup", action="store_true", help="only start-up and memory at 1,000 and 10,000 workers")
    args = parser.parse_args()
    if args.startup:
        startup(args.keep or Path(tempfile.mkdtemp(prefix="fedlink-simstart-")), args.processes)
        return
    root = shared_data_dir()
    if root is None or not (root / "mnist").is_dir():
        sys.exit("MNIST not found: set FEDLINK_SHARED_DATA to the folder holding mnist/")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="fedlink-simbench-"))
    folder.mkdir(parents=True, exist_ok=True)
    x, y = load_mnist(root / "mnist")
    save_shard(folder / "train.npy", x[:8000], y[:8000])
    save_shard(folder / "test.npy", x[8000:], y[8000:])
    simulation = {
        "data": "train.npy", "workers": args.workers, "partition": "iid", "backend": "local",
        "processes": args.processes, "resources": {"cpus": 1},
    }
    fraction = args.per_round / args.workers
    config = {
        "name": "simbench", "seed": 0, "model": {"factory": "fedlink.models:mnist_cnn"}, "rounds": args.rounds,
        "sampling": {"fraction": fraction, "min_workers": args.per_round},
        "training": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0}},
        "evaluation": {"data": "test.npy", "every": args.rounds}, "output": "fedlink-run", "simulation": simulation,
    }
    (folder / "simulate.yaml").write_text(yaml.safe_dump(config))
    partition = save_partition(
        folder / "partition.npz",
        partition_data(SimulationConfig.model_validate({**simulation, "data": folder / "train.npy"}), 0),
    )
    rows: list[dict[str, Any]] = []
    status, wall, peak = measured(
        [str(ROOT / ".venv/bin/fl-coordinator"), "simulate", "simulate.yaml"], cwd=folder
    )
    if status != 0:
        sys.exit(f"fl-coordinator simulate failed with status {status}")
    records = [json.loads(line) for line in (folder / "fedlink-run" / "metrics.jsonl").read_text().splitlines()]
    for theirs, ours in zip(load_partition(folder / "fedlink-run" / PARTITION_FILE), load_partition(partition)):
        assert np.array_equal(theirs, ours), "fedlink's partition differs from the one Flower reads"
    updates = sum(r["workers"] for r in records)
    seconds = sum(r["round_seconds"] for r in records)
    rows.append({"engine": "fedlink simulate (local)", "updates": updates, "seconds": seconds, "wall": wall, "peak": peak,
                 "accuracy": records[-1]["accuracy"]})
    if args.flower_python:
        out = folder / "flower.json"
        status, wall, peak = measured(
            [args.flower_python, str(ROOT / "bench/simulation_flower.py"), "--data", "train.npy", "--partition",
             str(partition), "--models", str(ROOT / "common/models.py"), "--rounds", str(args.rounds), "--fraction",
             str(fraction), "--cpus", "1", "--out", str(out)],
            cwd=folder,
        )
        if status != 0 or not out.exists():
            sys.exit(f"Flower's simulation failed with status {status}")
        flower = json.loads(out.read_text())
        rows.append({"engine": "Flower 1.41 run_simulation (ray)", "updates": flower["updates"],
                     "seconds": flower["round_seconds"], "wall": flower["wall_seconds"], "peak": peak, "accuracy": None})
    print(f"\n{args.workers} virtual workers, {args.per_round} per round, {args.rounds} rounds, 1 epoch, "
          f"{args.processes} processes/clients at once, MNIST CNN")
    print(f"{'engine':<34} {'updates':>7} {'round s':>8} {'updates/s':>10} {'wall s':>7} {'peak MB':>8}")
    for row in rows:
        rate = row["updates"] / row["seconds"] if row["seconds"] else float("nan")
        row["rate"] = rate
        print(f"{row['engine']:<34} {row['updates']:>7} {row['seconds']:>8.2f} {rate:>10.1f} {row['wall']:>7.1f} {row['peak']:>8.0f}")
    if len(rows) == 2 and rows[1]["rate"] > 0:
        print(f"fedlink / Flower, client updates per second: {rows[0]['rate'] / rows[1]['rate']:.2f}x")
    print(f"fedlink final accuracy (2,000 held-out images): {rows[0]['accuracy']:.4f}")
    (folder / "figures.json").write_text(json.dumps(rows, indent=2))
    print(f"figures: {folder / 'figures.json'}")


if __name__ == "__main__":
    main()
