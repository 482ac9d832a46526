"""The small sweep behind the server-side defaults of FedAdagrad, FedAdam, FedYogi (and FedAvgM's momentum).

    python examples/mnist-noniid/sweep.py [--rounds 25] [--out runs/noniid-sweep]

Runs the pathological non-IID MNIST job of config.yaml (10 workers x 2 classes, 5 per round, one local epoch of
SGD 0.05, batch 32 unless --batch-size says otherwise) once per setting below, against the same 10 worker processes, and prints a markdown table: accuracy
after the last round, best accuracy and the first round at 95%. The table in README.md comes from this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from compare import TARGET, prepare, rounds_to, run_jobs

GRID: dict[str, dict[str, Any]] = {
    **{f"fedadam-eta{eta:g}": {"name": "fedadam", "eta": eta} for eta in (0.01, 0.03, 0.05, 0.1)},
    **{f"fedyogi-eta{eta:g}": {"name": "fedyogi", "eta": eta} for eta in (0.01, 0.03, 0.05, 0.1)},
    **{f"fedadagrad-eta{eta:g}": {"name": "fedadagrad", "eta": eta} for eta in (0.03, 0.1)},
    "fedadam-eta0.03-tau0.01": {"name": "fedadam", "eta": 0.03, "tau": 0.01},
    "fedadam-eta0.03-beta1-0.7": {"name": "fedadam", "eta": 0.03, "beta1": 0.7},
    "fedavgm-m0.8": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.8},
    "fedavgm-m0.9": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9},
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("runs/noniid-sweep"))
    parser.add_argument("--only", nargs="*", default=list(GRID), choices=list(GRID))
    parser.add_argument("--batch-size", type=int, default=32, help="local batch (the README's sweep: 32)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out)
    histories = run_jobs({k: GRID[k] for k in args.only}, rounds=args.rounds, out=args.out, data=data, quiet=True,
                         training={"batch_size": args.batch_size})
    print(f"\n| setting | accuracy after {args.rounds} rounds | best | rounds to {TARGET:.0%} |\n|---|---|---|---|")
    for label, history in histories.items():
        reached = rounds_to(history)
        best = max(h["accuracy"] for h in history)
        print(f"| {label} | {history[-1]['accuracy']:.4f} | {best:.4f} | "
              f"{reached if reached is not None else f'not in {args.rounds}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
