"""The privacy quality table of the README: MNIST's first 8,000 images, the CNN, with and without DP.

    python examples/privacy/run_table.py --out runs/privacy-table               # every row
    python examples/privacy/run_table.py --out runs/privacy-table --only central # one row (repeatable)

Rows (each a ``fl-coordinator simulate`` job over virtual workers, so one machine runs it; the workers' logic is
the real one, DP-SGD and accountants included):

- ``no-dp``: 10 workers IID (800 images each), FedAvg, 20 rounds;
- ``local-1``, ``local-4``, ``local-8``: the same with local DP-SGD on every worker, ``target_epsilon`` 1, 4, 8 at
  delta 1e-5 per worker after 20 rounds (the multiplier is solved by each worker for its 20 x 13 steps), DP-SGD
  with per-example clip 1.0, batches of 64 (Poisson), SGD lr 0.5 and momentum 0.5 (``--local-lr``,
  ``--local-momentum``);
- ``central``: 100 workers of 80 images, Poisson sampling q = 0.2, DP-FedAvg with z = 1 and clip 0.5, 50 rounds.

The held-out set is the last 2,000 images of the same file. Prints a markdown table (also written to
``OUT/table.md``); each row's run folder holds its ``metrics.jsonl``, with ``epsilon`` on every line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CNN = {"factory": "fedlink.models:mnist_cnn", "kwargs": {}}


def _base(data: Path, out: Path, workers: int, rounds: int) -> dict[str, Any]:
    return {
        "name": out.name, "seed": 0, "model": CNN, "rounds": rounds,
        "simulation": {"data": str(data / "shard-0.npy"), "workers": workers, "partition": "iid", "processes": 2},
        "evaluation": {"data": str(data / "test.npy"), "every": 5},
        "output": str(out),
    }


def configs(data: Path, out: Path, *, local_lr: float = 0.5, local_momentum: float = 0.5) -> dict[str, dict[str, Any]]:
    """Every row's job, by row name."""
    rows: dict[str, dict[str, Any]] = {}
    rows["no-dp"] = {
        **_base(data, out / "no-dp", 10, 20),
        "training": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    }
    for eps in (1, 4, 8):
        rows[f"local-{eps}"] = {
            **_base(data, out / f"local-{eps}", 10, 20),
            "training": {
                "epochs": 1, "batch_size": 64, "update": "delta",
                "optimizer": {"name": "sgd", "lr": local_lr, "momentum": local_momentum},
            },
            "privacy": {"mode": "local", "clip_norm": 1.0, "target_epsilon": eps, "delta": 1e-5},
        }
    rows["central"] = {
        **_base(data, out / "central", 100, 50),
        "sampling": {"mode": "poisson", "rate": 0.2, "min_workers": 1},
        "training": {
            "epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "update": "delta",
        },
        "privacy": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5},
    }
    return rows


def describe(name: str) -> str:
    if name == "no-dp":
        return "no DP, 10 workers"
    if name.startswith("local-"):
        return f"local DP-SGD, target epsilon {name.split('-')[1]} per worker, 10 workers"
    return "central DP (DP-FedAvg), 100 workers, q = 0.2, z = 1, clip 0.5"


def run(config: dict[str, Any], folder: Path) -> tuple[dict[str, Any] | None, float]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fedlink.server", "simulate", str(path)], capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    (folder / "stderr.log").write_text(done.stderr)
    metrics = Path(config["output"]) / "metrics.jsonl"
    if done.returncode != 0 or not metrics.exists():
        print(f"{folder.name}: failed (see {folder / 'stderr.log'})\n{done.stderr[-2000:]}", file=sys.stderr)
        return None, seconds
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return (lines[-1] if lines else None), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", action="append", default=[], help="row name (no-dp, local-1, local-4, local-8, central)")
    parser.add_argument("--data", type=Path, default=None, help="a prepare_data.py mnist --workers 1 folder")
    parser.add_argument("--local-lr", type=float, default=0.5, help="DP-SGD learning rate of the local rows")
    parser.add_argument("--local-momentum", type=float, default=0.5, help="DP-SGD momentum of the local rows")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    data = args.data.resolve() if args.data is not None else out / "data"
    if not (data / "shard-0.npy").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", "1", "--out", str(data)],
            check=True, env={**os.environ},
        )
    rows = configs(data, out, local_lr=args.local_lr, local_momentum=args.local_momentum)
    chosen = args.only or list(rows)
    unknown = sorted(set(chosen) - set(rows))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows are {', '.join(rows)}")
    table = ["| run | rounds | accuracy | epsilon (delta 1e-5) | minutes |", "|---|---:|---:|---:|---:|"]
    for name in chosen:
        last, seconds = run(rows[name], out / name)
        if last is None:
            table.append(f"| {describe(name)} | - | failed | - | {seconds / 60:.1f} |")
        else:
            acc, eps = last.get("accuracy"), last.get("epsilon")
            table.append(
                f"| {describe(name)} | {last['round']} | {acc:.1%} | "
                + (f"{eps:.2f}" if eps is not None else "-") + f" | {seconds / 60:.1f} |"
            )
        print(table[-1], flush=True)
    text = "\n".join(table) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
