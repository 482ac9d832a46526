"""The same two jobs on fedlink and on Flower 1.41's deployment runtime, in one run, side by side.

    python3.11 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install torch==2.13.0 flwr==1.41.0
    python bench/vs_flower.py [--flower-python /tmp/flwr-venv/bin/python] [--workloads w1 w2]

- **W1**: fedlink's MNIST CNN (``fedlink.models:mnist_cnn``), 3 workers over the IID MNIST shards of
  ``examples/prepare_data.py``, 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, 10 rounds of FedAvg, the
  held-out set evaluated after every round. Printed: round time (median over rounds 2-10, and round 1), and the
  accuracy after rounds 1, 5 and 10.
- **W2**: ``fedlink.models:sized_mlp`` of 400 MB (about 100M float32 parameters), 3 workers, one local SGD step
  on one batch of 32, 3 rounds. Printed: round time, and the coordinator side's peak resident memory above what
  it held once started, as a multiple of the model.

fedlink runs real ``fl-worker`` processes on loopback; its W2 coordinator runs in a child process of
``bench/coordinator_memory.py``, whose ``VmHWM`` accounting gives the peak. Flower runs a SuperLink and one
SuperNode per worker, and ``flwr run`` (``bench/flower_deployment.py``, in Flower's own venv: it never imports
fedlink; the model code is read from ``common/models.py`` by path, the shards are the same files). Needs
``../shared/data`` (MNIST) and about 8 GB of free memory for W2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers

ROOT = Path(__file__).resolve().parent.parent
W2_MEGABYTES = 400.0


def _load_bench_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mnist_shards(folder: Path) -> tuple[list[Path], Path]:
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", "3", "--out", str(folder)],
        check=True, capture_output=True,
    )
    return [folder / f"shard-{i}.npy" for i in range(3)], folder / "test.npy"


def fedlink_w1(shards: list[Path], test: Path, rounds: int, out: Path) -> dict[str, Any]:
    workers = start_workers(shards, extra_args=["--threads", "1"])
    try:
        config = {
            "name": "vs-flower-w1", "seed": 0,
            "model": {"factory": "fedlink.models:mnist_cnn"},
            "workers": [w.url for w in workers], "rounds": rounds,
            "sampling": {"fraction": 1.0, "min_workers": 3},
            "training": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
            "evaluation": {"data": str(test), "every": 1},
            "output": str(out),
        }
        history = asyncio.run(Coordinator(parse_config(config)).run())
    finally:
        stop_workers(workers)
    return {"round_seconds": [r["wall_seconds"] for r in history], "accuracy": [r["accuracy"] for r in history]}


def fedlink_w2(folder: Path, rounds: int) -> dict[str, Any]:
    memory = _load_bench_module("coordinator_memory")
    folder.mkdir(parents=True, exist_ok=True)
    shards = memory.make_shards(folder, 3, samples=32, features=64)
    workers = start_workers(shards, extra_args=["--threads", "1"])
    try:
        config = memory.job_config([w.url for w in workers], megabytes=W2_MEGABYTES, rounds=rounds,
                                   output=folder / "run")
        spec = {"config": config, "threads": 1, "heap_interval": 0.001}
        result: dict[str, Any] = memory.run_child(spec, interval=0.05, timeout=1800, env=dict(os.environ))
    finally:
        stop_workers(workers)
    return {
        "round_seconds": result["round_seconds"],
        "model_bytes": result["model_bytes"],
        "peak_growth_bytes": result["peak_run"] - result["rss_imports"],
    }


def flower(python: str, workload: str, shards: list[Path], test: Path | None, rounds: int, work: Path) -> dict[str, Any]:
    out = work / f"flower-{workload}.json"
    command = [python, str(ROOT / "bench" / "flower_deployment.py"), "--workload", workload, "--rounds", str(rounds),
               "--shards", *map(str, shards), "--out-json", str(out), "--workdir", str(work / f"flower-{workload}")]
    if test is not None:
        command += ["--test", str(test)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"Flower's {workload} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _median_after_first(seconds: list[float]) -> float:
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flower-python", default="/tmp/flwr-venv/bin/python")
    parser.add_argument("--workloads", nargs="*", default=["w1", "w2"], choices=["w1", "w2"])
    parser.add_argument("--w1-rounds", type=int, default=10)
    parser.add_argument("--w2-rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    checks: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        work = Path(tmp)
        if "w1" in args.workloads:
            shards, test = mnist_shards(work / "mnist")
            ours = fedlink_w1(shards, test, args.w1_rounds, work / "w1-fedlink")
            theirs = flower(args.flower_python, "w1", shards, test, args.w1_rounds, work)
            print("\nW1: MNIST CNN, 3 workers, 1 epoch, batch 32, SGD 0.05/0.9")
            print(f"  {'':8} {'round 1 s':>10} {'later rounds s (median)':>24} {'acc r1':>8} {'acc r5':>8} {'acc r10':>8}")
            for label, run in (("fedlink", ours), ("Flower", theirs)):
                acc = run["accuracy"]
                picks = [acc[i - 1] if len(acc) >= i else float("nan") for i in (1, 5, 10)]
                print(f"  {label:8} {run['round_seconds'][0]:>10.2f} {_median_after_first(run['round_seconds']):>24.2f} "
                      + " ".join(f"{a:>8.4f}" for a in picks))
            ratio = _median_after_first(ours["round_seconds"]) / _median_after_first(theirs["round_seconds"])
            print(f"  round time, fedlink / Flower: {ratio:.2f}x")
            checks.append((f"W1 round time <= 0.2x Flower's ({ratio:.2f}x)", ratio <= 0.2))
        if "w2" in args.workloads:
            ours = fedlink_w2(work / "w2-fedlink", args.w2_rounds)
            shards = sorted((work / "w2-fedlink").glob("shard-*.npy"))
            theirs = flower(args.flower_python, "w2", shards, None, args.w2_rounds, work)
            model = ours["model_bytes"]
            print(f"\nW2: sized_mlp {W2_MEGABYTES:.0f} MB ({model / 2**20:.0f} MiB of state), 3 workers, one local step")
            print(f"  {'':8} {'round s (median)':>17} {'coordinator peak growth':>24}")
            ours_round = statistics.median(ours["round_seconds"])
            theirs_round = statistics.median(theirs["round_seconds"])
            print(f"  {'fedlink':8} {ours_round:>17.2f} {ours['peak_growth_bytes'] / 2**20:>18.0f} MiB "
                  f"({ours['peak_growth_bytes'] / model:.2f}x)")
            flower_growth = theirs["serverapp_peak_growth_bytes"]
            print(f"  {'Flower':8} {theirs_round:>17.2f} {flower_growth / 2**20:>18.0f} MiB "
                  f"({flower_growth / model:.2f}x; SuperLink peak {theirs['superlink_peak_bytes'] / 2**20:.0f} MiB)")
            print(f"  round time, fedlink / Flower: {ours_round / theirs_round:.2f}x")
            checks.append((f"W2 round time <= 8 s ({ours_round:.2f} s)", ours_round <= 8.0))
            growth = ours["peak_growth_bytes"] / model
            checks.append((f"W2 coordinator peak <= 2.5x the model above imports ({growth:.2f}x)", growth <= 2.5))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
