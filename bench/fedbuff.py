"""Asynchronous FedBuff against synchronous FedAvg when one worker is five times slower than the others.

    python bench/fedbuff.py                    # MNIST (8,000 images), 5 workers, one with --slowdown 5
    python bench/fedbuff.py --target 0.97 --max-seconds 900

Both jobs run in this one invocation, one after the other, on the same five ``fl-worker`` processes (each
``--threads 1``; worker-4 runs ``--slowdown 5``, so every job it takes lasts five times as long). Synchronous
FedAvg waits for the slow worker every round; FedBuff (``buffer_size`` 3, polynomial staleness) updates the model
every three results, whoever sends them. Printed for each: the wall time and the number of server updates until
the held-out accuracy first reaches the target, and the final accuracy; then the ratio of the two wall times.

The data comes from the shared MNIST files through ``examples/prepare_data.py mnist --workers 5``; without them
the benchmark says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from round_overhead import coordinator_command, machine_load, mnist_available  # noqa: E402


def job_config(urls: list[str], test: Path, out: Path, *, asynchronous: bool, rounds: int) -> dict[str, Any]:
    return {
        "name": "fedbuff" if asynchronous else "fedavg-sync",
        "seed": 0,
        "model": {"factory": "fedlink.models:mnist_cnn", "kwargs": {}},
        "workers": urls,
        "rounds": rounds,
        "sampling": {"min_workers": 3},
        "training": {
            "epochs": 1, "batch_size": 32, "update": "delta",
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        "strategy": {"name": "fedbuff", "buffer_size": 3, "server_lr": 1.0} if asynchronous else {"name": "fedavg"},
        "timeouts": {"round": 600},
        "evaluation": {"data": str(test), "every": 1},
        "output": str(out),
    }


def run(folder: Path, config: dict[str, Any], target: float, max_seconds: float) -> dict[str, Any]:
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run([*coordinator_command(), "train", str(path)], capture_output=True, timeout=max_seconds + 600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{config['name']} failed:\n{done.stderr.decode()[-2000:]}")
    records = [json.loads(line) for line in (Path(config["output"]) / "metrics.jsonl").read_text().splitlines()]
    elapsed, reached = 0.0, None
    for record in records:
        elapsed += record["wall_seconds"]
        if reached is None and (record.get("accuracy") or 0) >= target:
            reached = (record["round"], elapsed)
    return {"records": records, "wall": wall, "reached": reached, "final": records[-1]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--sync-rounds", type=int, default=12)
    parser.add_argument("--async-updates", type=int, default=30)
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=1800)
    args = parser.parse_args(argv)
    if mnist_available() is None:
        print("MNIST not found (../shared/data or $FEDLINK_SHARED_DATA): nothing to measure")
        return 0
    from fedlink.server.localworkers import spawn_worker, stop_workers, wait_ready

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run(
            [sys.executable, str(REPO / "examples" / "prepare_data.py"), "mnist", "--workers", "5", "--out", str(folder)],
            check=True, stdout=subprocess.DEVNULL,
        )
        spawned = [
            spawn_worker(folder / f"shard-{i}.npy", worker_id=f"worker-{i}",
                         extra_args=["--threads", "1", *(["--slowdown", str(args.slowdown)] if i == 4 else [])])
            for i in range(5)
        ]
        workers = [wait_ready(s) for s in spawned]
        try:
            urls = [w.url for w in workers]
            print(f"fedbuff vs synchronous fedavg: MNIST 8,000 images, 5 workers, worker-4 {args.slowdown:g}x slower; "
                  f"{machine_load()}")
            sync = run(folder, job_config(urls, folder / "test.npy", folder / "sync", asynchronous=False,
                                          rounds=args.sync_rounds), args.target, args.max_seconds)
            buffered = run(folder, job_config(urls, folder / "test.npy", folder / "async", asynchronous=True,
                                              rounds=args.async_updates), args.target, args.max_seconds)
        finally:
            stop_workers(workers)
    print(f"{'job':<22}{'updates to target':>18}{'seconds to target':>19}{'final accuracy':>16}{'job seconds':>13}")
    for label, result in (("fedavg (synchronous)", sync), ("fedbuff (K=3)", buffered)):
        reached = result["reached"]
        rounds, seconds = (str(reached[0]), f"{reached[1]:.1f}") if reached else ("not reached", "-")
        print(f"{label:<22}{rounds:>18}{seconds:>19}{result['final']:>16.4f}{result['wall']:>13.1f}")
    if sync["reached"] and buffered["reached"]:
        ratio = buffered["reached"][1] / sync["reached"][1]
        print(f"fedbuff reaches {args.target:.0%} in {ratio:.2f}x the wall time of synchronous fedavg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
