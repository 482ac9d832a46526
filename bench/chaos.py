"""Chaos run: a federated job while workers are SIGKILLed and restarted and links are cut, against a clean run.

    python bench/chaos.py                                   # 20 rounds of MNIST over 5 workers (the reference run)
    python bench/chaos.py --dataset digits --rounds 8 --workers 4 --kill-every 3   # the short version CI runs

Each worker sits behind its own fault proxy (loopback). During the chaos run a seeded random worker is killed
with SIGKILL every ``--kill-every`` seconds and restarted on its port, and at the start of every round one random
proxy cuts its connection partway through the model transfer. Then the same job runs clean on the same workers.
Prints per-round participation, kills, cuts and both final accuracies; exits 1 if the chaos run did not finish
every round or ended more than ``--tolerance`` accuracy points from the clean run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedlink.datasets import load_digits, load_mnist, shared_data_dir
from fedlink.faults import FaultProxy
from fedlink.server.config import JobConfig, parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import LocalWorker, start_workers, stop_workers
from fedlink.server.progress import Progress
from fedlink.server.split import partition_iid
from fedlink.shards import save_shard


def prepare(dataset: str, workers: int, folder: Path) -> tuple[list[Path], Path, dict[str, Any]]:
    if dataset == "mnist":
        root = shared_data_dir()
        if root is None:
            sys.exit("MNIST not found: set FEDLINK_SHARED_DATA to the folder holding mnist/")
        x, y = load_mnist(root / "mnist")
        train_x, train_y, test_x, test_y = x[:8000], y[:8000], x[8000:], y[8000:]
        model = {"factory": "fedlink.models:mnist_cnn", "kwargs": {}}
        training = {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    else:
        x, y = load_digits()
        order = np.random.default_rng(0).permutation(len(y))
        test, train = order[:297], order[297:]
        train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
        model = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 256, "num_classes": 10}}
        training = {"epochs": 5, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    rng = np.random.default_rng(0)
    shards = [
        save_shard(folder / f"shard-{i}.npy", train_x[p], train_y[p])
        for i, p in enumerate(partition_iid(len(train_y), workers, rng))
    ]
    return shards, save_shard(folder / "test.npy", test_x, test_y), {"model": model, "training": training}


class Chaos(Progress):
    """Cuts one random link per round (partway through the model transfer) and kills workers on a timer."""

    def __init__(self, workers: list[LocalWorker], proxies: list[FaultProxy], *, seed: int, kill_every: float, model_bytes: int) -> None:
        self.workers, self.proxies = workers, proxies
        self.rng = random.Random(seed)
        self.kill_every = kill_every
        self.model_bytes = model_bytes
        self.kills: list[tuple[float, str]] = []
        self.cuts: list[int] = []
        self._cut_rounds: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._killer, name="chaos-killer", daemon=True)

    def __enter__(self) -> "Chaos":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None:
        if status == "training" and server_round not in self._cut_rounds:
            self._cut_rounds.add(server_round)
            proxy = self.rng.choice(self.proxies)
            proxy.cut_after(self.rng.randint(self.model_bytes // 10, self.model_bytes // 2))
            self.cuts.append(server_round)

    def _killer(self) -> None:
        while not self._stop.wait(self.kill_every):
            victim = self.rng.choice(self.workers)
            with self._lock:
                victim.kill()
                self.kills.append((round(time.monotonic() - self._started, 1), victim.log_path.stem))
                try:
                    victim.restart()
                except Exception as exc:  # noqa: BLE001 - report and keep going: the run must survive it
                    print(f"restart of {victim.log_path.stem} failed: {exc}", file=sys.stderr)


def config(urls: list[str], test: Path, out: Path, rounds: int, job: dict[str, Any], min_workers: int) -> JobConfig:
    return parse_config(
        {
            "name": "chaos",
            "seed": 0,
            **job,
            "workers": urls,
            "rounds": rounds,
            "sampling": {"fraction": 1.0, "min_workers": min_workers},
            "timeouts": {"round": 120, "heartbeat": 1.0, "reconnect_max": 1.0, "wait_for_workers": 120, "connect": 5},
            "evaluation": {"data": str(test)},
            "output": str(out),
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy points allowed between runs")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        shards, test, job = prepare(args.dataset, args.workers, folder)
        workers = start_workers(shards, extra_args=["--threads", "1"])
        proxies = [FaultProxy.for_url(w.url) for w in workers]
        for proxy in proxies:
            proxy.start()
        try:
            urls = [p.url for p in proxies]
            min_workers = max(1, args.workers - 2)
            chaos_job = Coordinator(config(urls, test, folder / "chaos", args.rounds, job, min_workers))
            model_bytes = sum(t.nbytes for t in chaos_job.state.values())
            started = time.perf_counter()
            with Chaos(workers, proxies, seed=args.seed, kill_every=args.kill_every, model_bytes=model_bytes) as chaos:
                chaos_job.progress = chaos
                chaos_history = asyncio.run(chaos_job.run())
            chaos_seconds = time.perf_counter() - started
            started = time.perf_counter()
            clean_history = asyncio.run(Coordinator(config(urls, test, folder / "clean", args.rounds, job, min_workers)).run())
            clean_seconds = time.perf_counter() - started
        finally:
            for proxy in proxies:
                proxy.close()
            stop_workers(workers)

    print(f"dataset {args.dataset}, {args.workers} workers, {args.rounds} rounds, kill every {args.kill_every:g}s")
    print("round  workers(chaos)  workers(clean)  accuracy(chaos)  accuracy(clean)  dropped(chaos)")
    for c, k in zip(chaos_history, clean_history):
        print(f"{c['round']:>5}  {c['workers']:>14}  {k['workers']:>14}  {c['accuracy']:>15.4f}  {k['accuracy']:>15.4f}  {json.dumps(sorted(c['dropped']))}")
    gap = 100 * abs(chaos_history[-1]["accuracy"] - clean_history[-1]["accuracy"])
    print(f"kills: {len(chaos.kills)} {chaos.kills}")
    print(f"connection cuts armed: {len(chaos.cuts)}; cuts made: {sum(p.stats.cuts for p in proxies)}")
    print(f"time: chaos {chaos_seconds:.1f}s, clean {clean_seconds:.1f}s")
    print(f"final accuracy: chaos {chaos_history[-1]['accuracy']:.4f}, clean {clean_history[-1]['accuracy']:.4f}, gap {gap:.2f} points (tolerance {args.tolerance:g})")
    ok = len(chaos_history) == args.rounds and gap <= args.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
