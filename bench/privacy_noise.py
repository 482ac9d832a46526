"""Keyed DP noise speed: 10M values from :class:`~fedlink.privacy.noise.NoiseSource` (goal: under 1 s each).

    python bench/privacy_noise.py            # 5 repetitions
    python bench/privacy_noise.py --reps 9 --size 20000000

Rows: ``gaussian`` (ChaCha20 keystream -> Box-Muller, float32 out), ``discrete`` (the vectorised Canonne-Kamath-
Steinke sampler, sigma 30, int64 out) and, for scale only, ``torch.randn`` (a fast generator whose outputs reveal
its state, which is why fedlink does not use it for noise). Every repetition times all rows back to back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fedlink.privacy.noise import NoiseSource


def machine_load() -> str:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    warning = "  (WARNING: other processes are using the CPUs; timings are inflated)" if load > 0.5 * cores else ""
    return f"load average (1 min) {load:.2f} on {cores} cores{warning}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    source = NoiseSource.create()
    rows: dict[str, Callable[[int], object]] = {
        "gaussian": lambda r: source.gaussian(r, "bench", "w", (args.size,), 1.0),
        "discrete": lambda r: source.discrete_gaussian(r, "bench", "w", (args.size,), 30.0),
        "torch.randn": lambda r: torch.randn(args.size),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    print(machine_load())
    for rep in range(args.reps):
        for name, draw in rows.items():
            start = time.perf_counter()
            draw(rep)
            times[name].append(time.perf_counter() - start)
    print(f"{'row':<12} {'median s':>9} {'min s':>7}   ({args.size:,} values, {args.reps} repetitions)")
    for name, values in times.items():
        print(f"{name:<12} {statistics.median(values):>9.3f} {min(values):>7.3f}")
    ok = all(statistics.median(times[name]) < 1.0 for name in ("gaussian", "discrete"))
    print(machine_load())
    print(f"{'PASS' if ok else 'FAIL'}: keyed gaussian and discrete noise under 1 s for {args.size:,} values (medians)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
