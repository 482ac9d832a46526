"""Update compression on MNIST: bytes uploaded per round and final accuracy, for each scheme, side by side.

    python bench/compression.py [--out runs/compression] [--iid-rounds 10] [--noniid-rounds 50] [--seeds 3]
                                [--schemes none float16 int8 topk]

Two jobs, each run once per scheme and seed against the same worker processes (for one seed, every scheme samples
the same workers in the same rounds and starts from the same model): MNIST IID over 3 workers (``examples/mnist-iid/config.yaml``) and the pathological non-IID
split, 10 workers x 2 classes, 5 per round (``examples/mnist-noniid/config.yaml``). Both send deltas
(``training.update: delta``: FedAvg's average of deltas is its average of weights, and int8 and top-k need deltas).
Accuracy is the held-out accuracy after the last round, averaged over the seeds (one seed's final accuracy moves by
a few tenths of a point from one seed to the next, more on the non-IID job). Prints a markdown table (the README's)
and the issue's checks: int8 within 0.3 points of none on IID; top-k 1% with error feedback uploads at most 3% of
the bytes and stays within 1.5 points. Needs ``../shared/data`` (MNIST); takes about 18 minutes with 3 seeds on a
2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.localworkers import start_workers, stop_workers

ROOT = Path(__file__).resolve().parent.parent
SCHEMES: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "float16": {"name": "float16"},
    "bfloat16": {"name": "bfloat16"},
    "int8": {"name": "int8"},
    "topk": {"name": "topk", "ratio": 0.01},
}
JOBS = {  # label: (example folder, workers, prepare_data.py options)
    "iid": ("mnist-iid", 3, []),
    "noniid": ("mnist-noniid", 10, ["--classes-per-worker", "2"]),
}


def prepare(out: Path, workers: int, options: list[str]) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", str(workers), *options,
         "--out", str(out)],
        check=True, capture_output=True,
    )
    return out


def run_job(
    job: str, rounds: int, schemes: list[str], seeds: int, out: Path
) -> dict[str, list[list[dict[str, Any]]]]:
    folder, count, options = JOBS[job]
    data = prepare(out / job / "data", count, options)
    base = yaml.safe_load((ROOT / "examples" / folder / "config.yaml").read_text())
    workers = start_workers([data / f"shard-{i}.npy" for i in range(count)], extra_args=["--threads", "1"])
    histories: dict[str, list[list[dict[str, Any]]]] = {scheme: [] for scheme in schemes}
    try:
        for seed in range(seeds):
            for scheme in schemes:
                config = dict(
                    base, name=f"compression-{job}-{scheme}-{seed}", seed=seed, workers=[w.url for w in workers],
                    rounds=rounds, output=str(out / job / f"{scheme}-{seed}"),
                    evaluation={"data": str(data / "test.npy"), "every": rounds},
                    training={**base["training"], "update": "delta", "compression": SCHEMES[scheme]},
                )
                history = asyncio.run(Coordinator(parse_config(config)).run())
                histories[scheme].append(history)
                print(f"{job} seed {seed} {scheme}: accuracy {history[-1]['accuracy']:.4f}, "
                      f"{per_worker_upload([history]) / 1e6:.3f} MB uploaded per worker per round", flush=True)
    finally:
        stop_workers(workers)
    return histories


def per_worker_upload(runs: list[list[dict[str, Any]]]) -> float:
    records = [r for history in runs for r in history]
    return sum(r["upload_bytes"] for r in records) / max(1, sum(r["workers"] for r in records))


def final_accuracy(runs: list[list[dict[str, Any]]]) -> tuple[float, float, float]:
    """Mean, lowest and highest accuracy after the last round, over the seeds."""
    finals = [history[-1]["accuracy"] for history in runs]
    return sum(finals) / len(finals), min(finals), max(finals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument("--iid-rounds", type=int, default=10)
    parser.add_argument("--noniid-rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3, help="runs per job and scheme, seeds 0..N-1")
    parser.add_argument("--schemes", nargs="*", default=["none", "float16", "int8", "topk"], choices=list(SCHEMES))
    args = parser.parse_args()
    if "none" not in args.schemes:
        parser.error("--schemes must include none: every figure is a ratio to it")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results = {
        job: run_job(job, rounds, args.schemes, args.seeds, args.out)
        for job, rounds in (("iid", args.iid_rounds), ("noniid", args.noniid_rounds))
    }
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    rows = [f"| job | scheme | uploaded per worker per round | share of none | final accuracy, mean of {args.seeds} "
            "seeds (range) | vs none (points) |",
            "|---|---|---:|---:|---:|---:|"]
    checks: list[tuple[str, bool]] = []
    for job, histories in results.items():
        plain_bytes = per_worker_upload(histories["none"])
        plain_accuracy = final_accuracy(histories["none"])[0]
        for scheme, runs in histories.items():
            share = per_worker_upload(runs) / plain_bytes
            mean, low, high = final_accuracy(runs)
            points = 100 * (mean - plain_accuracy)
            rows.append(f"| {job} ({len(runs[0])} rounds) | {scheme} | {per_worker_upload(runs) / 1e6:.3f} MB | "
                        f"{share:.1%} | {mean:.2%} ({low:.2%}-{high:.2%}) | {points:+.2f} |")
            if scheme == "int8" and job == "iid":
                checks.append((f"int8 on IID within 0.3 points of none ({points:+.2f})", points >= -0.3))
            if scheme == "topk":
                checks.append((f"top-k 1% on {job} uploads <= 3% of none ({share:.2%})", share <= 0.03))
                checks.append((f"top-k 1% on {job} within 1.5 points of none ({points:+.2f})", points >= -1.5))
    print("\n".join(rows) + "\n")
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    (args.out / "compression.json").write_text(json.dumps(
        {job: {s: h for s, h in histories.items()} for job, histories in results.items()}, indent=1
    ))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
