"""Round overhead of the reference MNIST job: how much of a round is not the slowest worker's own training.

    python bench/round_overhead.py              # examples/mnist-iid: 3 workers, built-in CNN, 10 rounds
    python bench/round_overhead.py --jobs 2     # run the whole job twice

The data comes from the shared MNIST files (``$FEDLINK_SHARED_DATA`` or ``../shared/data``) through
``examples/prepare_data.py mnist --workers 3``; without them the benchmark says so and exits with status 0.
Three ``fl-worker`` processes (``--threads 1``) serve the shards; the coordinator is ``fl-coordinator train`` on
``examples/mnist-iid/config.yaml`` with only the worker URLs, the held-out set and the output folder changed.

From each round of ``metrics.jsonl``:

* ``round_seconds``: dispatch of the training requests until the aggregated model is ready;
* ``wall_seconds``: from the previous round's aggregated model to this one's, the federation's real pace (the
  coordinator evaluates round r while round r+1 trains, so evaluation counts only where it slows the workers);
* ``seconds``: ``round_seconds`` plus the coordinator's centralized evaluation of the new model;
* ``slowest_train_seconds``: the largest ``train_seconds`` a worker reported (build model, load weights, train,
  extract the update -- on the worker, without any transfer).

Overhead share = (round wall - slowest train) / round wall, with round wall = ``round_seconds`` (excluding
evaluation), ``wall_seconds`` (real pace, evaluation overlapped) or ``seconds`` (evaluation in series). The goal is under 10%; the median over the rounds is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

GOAL = 0.10
ACCURACY_GOAL = 0.97
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "mnist-iid" / "config.yaml"


def machine_load() -> str:
    """The 1-minute load average against the core count: timings mean little on a busy machine."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = "  WARNING: other processes are using the CPUs; timings are inflated" if load > 0.5 * cores else ""
    return f"load average {load:.2f} on {cores} cores{note}"


def coordinator_command() -> list[str]:
    script = Path(sys.executable).with_name("fl-coordinator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedlink.server"]


def mnist_available() -> Path | None:
    from fedlink.datasets import shared_data_dir

    base = shared_data_dir()
    if base is None or not (base / "mnist").is_dir():
        return None
    return base


def prepare(out: Path) -> list[Path]:
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "prepare_data.py"), "mnist", "--workers", "3", "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return [out / f"shard-{i}.npy" for i in range(3)]


def write_config(path: Path, urls: list[str], *, test: Path, output: Path, rounds: int | None) -> dict[str, Any]:
    config = yaml.safe_load(EXAMPLE.read_text())
    config["workers"] = urls
    config["evaluation"]["data"] = str(test)
    config["output"] = str(output)
    if rounds is not None:
        config["rounds"] = rounds
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def run_job(folder: Path, urls: list[str], data: Path, *, rounds: int | None, job: int) -> list[dict[str, Any]]:
    config_path = folder / f"job-{job}.yaml"
    output = folder / f"run-{job}"
    write_config(config_path, urls, test=data / "test.npy", output=output, rounds=rounds)
    started = time.perf_counter()
    done = subprocess.run(
        [*coordinator_command(), "train", str(config_path), "--log-level", "warning"],
        capture_output=True, text=True, timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"fl-coordinator failed (exit status {done.returncode}):\n{done.stderr[-4000:]}")
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print(f"job {job + 1}: {len(records)} rounds in {wall:.1f}s (coordinator process wall time, startup included)")
    return records


def share(wall: float, train: float) -> float:
    return (wall - train) / wall if wall > 0 else float("nan")


def report(records: list[dict[str, Any]], *, label: str) -> None:
    print(f"\n{label}")
    print(f"  {'round':>5} {'round_s':>8} {'wall_s':>8} {'slowest':>8} {'seconds':>8} {'eval_s':>7}  {'ovh excl eval':>13} "
          f"{'ovh wall':>9} {'ovh incl eval':>13}  {'accuracy':>8}")
    for r in records:
        acc = r.get("accuracy")
        print(
            f"  {r['round']:>5} {r['round_seconds']:>8.3f} {r['wall_seconds']:>8.3f} {r['slowest_train_seconds']:>8.3f} "
            f"{r['seconds']:>8.3f} {r['seconds'] - r['round_seconds']:>7.3f}  "
            f"{share(r['round_seconds'], r['slowest_train_seconds']):>13.1%} "
            f"{share(r['wall_seconds'], r['slowest_train_seconds']):>9.1%} "
            f"{share(r['seconds'], r['slowest_train_seconds']):>13.1%}  {acc if acc is None else f'{acc:.4f}':>8}"
        )


def summary(records: list[dict[str, Any]], *, label: str) -> None:
    excl = [share(r["round_seconds"], r["slowest_train_seconds"]) for r in records]
    incl = [share(r["seconds"], r["slowest_train_seconds"]) for r in records]
    # wall_seconds: from one aggregated model to the next, the federation's real pace; the coordinator
    # evaluates round r while round r+1 trains, so evaluation only counts where it slows the workers.
    wall = [share(r["wall_seconds"], r["slowest_train_seconds"]) for r in records]
    overhead_s = [r["round_seconds"] - r["slowest_train_seconds"] for r in records]
    eval_s = [r["seconds"] - r["round_seconds"] for r in records]
    print(f"  {label} ({len(records)} rounds):")
    for name, values in (
        ("excluding evaluation (round_seconds)", excl),
        ("wall clock, evaluation overlapped (wall_seconds)", wall),
        ("including evaluation in series (seconds)", incl),
    ):
        med = statistics.median(values)
        print(f"    overhead share {name}: median {med:6.1%}  min {min(values):6.1%}  max {max(values):6.1%}"
              f"   {'PASS' if med < GOAL else 'FAIL'} (goal < {GOAL:.0%})")
    print(f"    overhead seconds (round_s - slowest): median {statistics.median(overhead_s):.3f}  "
          f"min {min(overhead_s):.3f};  evaluation seconds: median {statistics.median(eval_s):.3f}  min {min(eval_s):.3f}")
    print(f"    round_seconds: median {statistics.median(r['round_seconds'] for r in records):.3f}  "
          f"min {min(r['round_seconds'] for r in records):.3f};  slowest train: median "
          f"{statistics.median(r['slowest_train_seconds'] for r in records):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="how many times to run the whole job")
    parser.add_argument("--rounds", type=int, default=None, help="override the config's rounds (default: its 10)")
    args = parser.parse_args(argv)

    base = mnist_available()
    if base is None:
        print("SKIP: MNIST not found (set FEDLINK_SHARED_DATA or put the t10k files in ../shared/data/mnist); "
              "see examples/prepare_data.py")
        return 0
    from fedlink.server.localworkers import LocalWorker, start_workers, stop_workers
    # SIGTERM would end us without the finally below, leaving the workers running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    print(f"fedlink round overhead benchmark: examples/mnist-iid, 3 workers (--threads 1), {os.cpu_count()} cores, "
          f"data from {base}")
    print(f"before: {machine_load()}")
    jobs: list[list[dict[str, Any]]] = []
    started: list[LocalWorker] = []
    with tempfile.TemporaryDirectory(prefix="fedlink-bench-") as tmp:
        folder = Path(tmp)
        shards = prepare(folder / "data")
        try:
            started = start_workers(shards, extra_args=["--threads", "1", "--log-level", "warning"], ready_timeout=120)
            print(f"started {len(started)} workers (pids {', '.join(str(w.pid) for w in started)})")
            urls = [w.url for w in started]
            for job in range(args.jobs):
                jobs.append(run_job(folder, urls, folder / "data", rounds=args.rounds, job=job))
        finally:
            stop_workers(started)

    print(f"after:  {machine_load()}")
    for job, records in enumerate(jobs):
        report(records, label=f"job {job + 1}: per round (seconds; overhead = (wall - slowest train) / wall)")
    everything = [r for records in jobs for r in records]
    print("\nsummary")
    summary(everything, label="all rounds")
    later = [r for r in everything if r["round"] > 1]
    if later and len(later) < len(everything):
        summary(later, label="rounds 2+ (first round includes the workers' one-time warm-up)")
    finals = [records[-1].get("accuracy") for records in jobs]
    for job, acc in enumerate(finals):
        if acc is None:
            print(f"  job {job + 1}: no final accuracy (evaluation disabled?)")
        else:
            print(f"  job {job + 1}: final accuracy after {jobs[job][-1]['round']} rounds {acc:.4f}   "
                  f"{'PASS' if acc >= ACCURACY_GOAL else 'FAIL'} (goal >= {ACCURACY_GOAL:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
