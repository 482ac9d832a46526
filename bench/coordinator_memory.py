"""Coordinator peak memory: 8 real worker processes, a ~50 MB model, a few FedAvg rounds; goal below 4x the model.

    python bench/coordinator_memory.py                  # 8 workers, 50 MB, 3 repetitions of 2 rounds
    python bench/coordinator_memory.py --workers 4 --megabytes 200 --reps 1 --rounds 3
    python bench/coordinator_memory.py --workers 3 --megabytes 400 --compression int8   # compressed updates
    python bench/coordinator_memory.py --workers 3 --megabytes 400 --strategy fedbuff    # asynchronous

Eight ``fl-worker`` processes (``--threads 1``) are started once on tiny random shards (64 samples of 64 float32
features), and serve every repetition. Each repetition runs the coordinator in a fresh child process (this script
with ``--child``): it imports fedlink, builds ``Coordinator(config)`` (which builds ``fedlink.models:sized_mlp``)
and runs ``Coordinator.run()`` with ``training.max_steps: 1`` and no evaluation.

Memory is measured inside the child from the kernel's own accounting, ``/proc/self/status``: ``VmRSS`` gives the
baselines, and ``VmHWM`` (the resident-set high-water mark, reset by writing ``5`` to ``/proc/self/clear_refs``
at each baseline) gives the exact peak of each phase, with no sampling gap. Two growths are reported against the
model's state size: peak during ``run()`` minus RSS after the imports (so the initial model and its copy count),
and minus RSS after ``Coordinator`` was built (what the rounds add). The parent also samples the child's RSS with
psutil every few milliseconds, as a cross-check; sampling can only under-read a peak.

RSS includes memory glibc keeps after ``free`` (its dynamic mmap threshold lets 25 MB tensors land in the heap),
so the peak varies by some 10-40 MB from run to run. To separate that from what the coordinator really holds, the
child also samples glibc's ``mallinfo2()`` (bytes malloc'd and not freed: every tensor, every frame buffer) every
millisecond; tracemalloc would not do, as torch allocates outside Python's allocator. ``--mmap-threshold-mib 1``
pins glibc's threshold in the coordinator, which makes the RSS figures repeat to the tenth of a MiB.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GOAL = 2.5
MiB = 1 << 20
_RESULT = "RESULT "


def machine_load() -> str:
    """The 1-minute load average against the core count: timings mean little on a busy machine."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = "  WARNING: other processes are using the CPUs; timings are inflated" if load > 0.5 * cores else ""
    return f"load average {load:.2f} on {cores} cores{note}"


# -- the child: one coordinator run ---------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapSampler(threading.Thread):
    """Polls glibc's ``mallinfo2()`` in this process: bytes handed out by malloc and not yet freed.

    That is every tensor's storage (torch's CPU allocator is malloc), every large Python ``bytes`` (frames) and C
    library buffers, but not memory malloc keeps after a ``free`` -- the difference to RSS is allocator retention.
    Python's small objects (pymalloc arenas) are not included. ``None`` where libc has no ``mallinfo2``.
    """

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self._interval = interval
        self._halt = threading.Event()
        self.peak = 0
        self.trace = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._mallinfo2 = libc.mallinfo2
            self._mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None

    @property
    def available(self) -> bool:
        return self._mallinfo2 is not None

    def in_use(self) -> int:
        info = self._mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def run(self) -> None:
        step = 32 * MiB
        while not self._halt.is_set():
            in_use = self.in_use()
            if self.trace and in_use > self.peak + step:
                log = logging.getLogger("bench.heap")
                log.warning("heap in use %.0f MiB (new peak)", in_use / MiB)
            self.peak = max(self.peak, in_use)
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def child(spec: dict[str, Any]) -> None:
    marks: dict[str, float] = {"start": time.time()}
    import asyncio
    import logging

    import torch

    from fedlink.protocol.tensors import header_of
    from fedlink.server.config import parse_config
    from fedlink.server.coordinator import Coordinator

    logging.basicConfig(
        level=logging.INFO if spec.get("trace") else logging.WARNING, stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(name)s %(message)s", datefmt="%H:%M:%S",
    )
    torch.set_num_threads(spec["threads"])
    config = parse_config(spec["config"], source="bench")
    marks["imported"] = time.time()
    imports = _status()
    resettable = _reset_peak()

    coordinator = Coordinator(config)
    marks["built"] = time.time()
    built = _status()
    _reset_peak()
    heap = HeapSampler(spec["heap_interval"])
    heap_built = heap.in_use() if heap.available else 0
    heap.trace = bool(spec.get("trace"))
    if heap.available:
        heap.start()

    history = asyncio.run(coordinator.run())
    marks["ran"] = time.time()
    ran = _status()
    if heap.available:
        heap.stop()
    result = {
        "resettable": resettable,
        "model_bytes": header_of(coordinator.state).nbytes,
        "rss_imports": imports["VmRSS"],
        "rss_built": built["VmRSS"],
        "peak_build": built["VmHWM"],
        "peak_run": ran["VmHWM"],
        "rss_end": ran["VmRSS"],
        "heap_built": heap_built,
        "heap_peak_run": heap.peak,
        "round_seconds": [r["round_seconds"] for r in history],
        "upload_bytes": [r["upload_bytes"] for r in history],
        "download_bytes": [r["download_bytes"] for r in history],
        "workers": [r["workers"] for r in history],
        "marks": marks,
    }
    print(_RESULT + json.dumps(result), flush=True)


# -- the parent: workers, repetitions, report -----------------------------------------------------------------------


class Sampler(threading.Thread):
    """Polls a process's RSS with psutil; keeps (time, rss) pairs."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self._process = psutil.Process(pid)
        self._interval = interval
        self._halt = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            self.samples.append((time.time(), rss))
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak_between(self, start: float, end: float) -> tuple[int, int]:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return (max(inside) if inside else 0), len(inside)


def worker_peak(pid: int) -> int:
    """A worker process's resident high-water mark, in bytes (0 where /proc cannot tell)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def make_shards(folder: Path, count: int, *, samples: int, features: int) -> list[Path]:
    import numpy as np

    from fedlink.shards import save_shard

    rng = np.random.default_rng(0)
    return [
        save_shard(
            folder / f"shard-{i}.npy",
            rng.standard_normal((samples, features), dtype=np.float32),
            rng.integers(0, 10, samples),
        )
        for i in range(count)
    ]


def job_config(
    urls: list[str], *, megabytes: float, rounds: int, output: Path, concurrent_uploads: int = 4,
    frozen_backbone: bool = False, compression: str = "none", strategy: str = "fedavg",
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"megabytes": megabytes, **({"frozen_backbone": True} if frozen_backbone else {})}
    # int8 and top-k compress deltas: FedAvg of deltas is FedAvg of weights.
    update = {} if compression == "none" else {"update": "delta", "compression": {"name": compression}}
    if strategy == "fedbuff":  # asynchronous: each server update folds as many results as there are workers
        update.setdefault("update", "delta")
    return {
        "name": "bench-coordinator-memory",
        "seed": 0,
        "model": {"factory": "fedlink.models:sized_mlp", "kwargs": kwargs},
        "workers": urls,
        "rounds": rounds,
        "sampling": {"fraction": 1.0, "min_workers": len(urls)},
        "training": {"epochs": 1, "batch_size": 32, "max_steps": 1,
                     "optimizer": {"name": "sgd", "lr": 0.01}, **update},
        "strategy": {"name": "fedbuff", "buffer_size": len(urls)} if strategy == "fedbuff" else {"name": "fedavg"},
        "timeouts": {"round": 300},
        "limits": {"concurrent_uploads": concurrent_uploads},
        "output": str(output),
    }


def run_child(spec: dict[str, Any], *, interval: float, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )
    sampler = Sampler(process.pid, interval)
    sampler.start()
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        sampler.stop()
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in out.splitlines() if line.startswith(_RESULT)]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"coordinator child failed (exit status {process.returncode}):\n{err[-4000:]}")
    if spec.get("trace"):
        print(err, file=sys.stderr)
    result: dict[str, Any] = json.loads(lines[-1][len(_RESULT):])
    marks = result["marks"]
    result["psutil_peak_run"], result["psutil_samples"] = sampler.peak_between(marks["built"], marks["ran"])
    return result


def mib(n: float) -> str:
    return f"{n / MiB:7.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--megabytes", type=float, default=50.0, help="model size (sized_mlp's megabytes, MiB)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per repetition")
    parser.add_argument("--concurrent-uploads", type=int, default=4,
                        help="limits.concurrent_uploads: updates received or waiting to fold at once (1: the least memory)")
    parser.add_argument("--reps", type=int, default=3, help="coordinator runs (fresh process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the coordinator")
    parser.add_argument("--interval", type=float, default=0.002, help="psutil sampling interval, seconds")
    parser.add_argument("--mmap-threshold-mib", type=float, default=0.0,
                        help="pin glibc's mmap threshold in the coordinator (MALLOC_MMAP_THRESHOLD_); 0: glibc's "
                             "dynamic default, as a real coordinator runs -- its heap retention then varies by run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a repetition may take")
    parser.add_argument("--frozen-backbone", action="store_true",
                        help="freeze all but the output layer (sized_mlp's frozen_backbone): after round 1 only the "
                             "head travels, and the fold leaves the backbone out")
    parser.add_argument("--compression", default="none", choices=["none", "float16", "bfloat16", "int8", "topk"],
                        help="training.compression (with update: delta): updates are held compressed and decoded "
                        "a tensor at a time")
    parser.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedbuff"],
                        help="fedbuff: asynchronous, a server update every --workers results (update: delta)")
    parser.add_argument("--trace", action="store_true",
                        help="print the coordinator's log with each new heap peak (of 32 MiB more), to see what holds memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    try:
        import psutil  # noqa: F401  (used by the sampler; fail early with a clear message)
    except ImportError:
        raise SystemExit("psutil is needed: pip install 'fedlink[bench]' (or pip install psutil)")
    from fedlink.server.localworkers import LocalWorker, start_workers, stop_workers

    # SIGTERM would end us without the finally below, leaving the workers running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(f"fedlink coordinator memory benchmark: {args.workers} workers, sized_mlp({args.megabytes:g} MB), "
          f"{args.rounds} rounds x {args.reps} repetitions, {os.cpu_count()} cores")
    print(f"before: {machine_load()}")
    child_env = dict(os.environ)
    if args.mmap_threshold_mib > 0:
        child_env["MALLOC_MMAP_THRESHOLD_"] = str(int(args.mmap_threshold_mib * MiB))
        print(f"coordinator runs with MALLOC_MMAP_THRESHOLD_={child_env['MALLOC_MMAP_THRESHOLD_']}")
    started: list[LocalWorker] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedlink-bench-") as tmp:
        folder = Path(tmp)
        shards = make_shards(folder, args.workers, samples=64, features=64)
        try:
            t0 = time.perf_counter()
            started = start_workers(shards, extra_args=["--threads", "1", "--log-level", "warning"], ready_timeout=120)
            print(f"started {len(started)} workers in {time.perf_counter() - t0:.1f}s "
                  f"(pids {', '.join(str(w.pid) for w in started)})")
            urls = [w.url for w in started]
            for rep in range(args.reps):
                spec = {
                    "config": job_config(urls, megabytes=args.megabytes, rounds=args.rounds, output=folder / f"run-{rep}",
                                         concurrent_uploads=args.concurrent_uploads,
                                         frozen_backbone=args.frozen_backbone, compression=args.compression,
                                         strategy=args.strategy),
                    "threads": args.threads,
                    "heap_interval": args.interval / 2,
                    "trace": args.trace,
                }
                result = run_child(spec, interval=args.interval, timeout=args.timeout, env=child_env)
                results.append(result)
                size = result["model_bytes"]
                print(
                    f"  rep {rep + 1}: peak {mib(result['peak_run'])} MiB; above imports "
                    f"{mib(result['peak_run'] - result['rss_imports'])} MiB "
                    f"({(result['peak_run'] - result['rss_imports']) / size:.2f}x), above built model "
                    f"{mib(result['peak_run'] - result['rss_built'])} MiB "
                    f"({(result['peak_run'] - result['rss_built']) / size:.2f}x); rounds "
                    + ", ".join(f"{s:.2f}s" for s in result["round_seconds"])
                )
                print("         bytes per round, down / up: " + ", ".join(
                    f"{down / MiB:,.1f} / {up / MiB:,.1f} MiB"
                    for down, up in zip(result["download_bytes"], result["upload_bytes"])
                ))
            workers_peak = [worker_peak(w.pid) for w in started]
            if all(workers_peak):
                print(f"  worker peak RSS (VmHWM): {', '.join(f'{mib(p).strip()} MiB' for p in workers_peak)}")
        finally:
            stop_workers(started)

    print(f"after:  {machine_load()}")
    size = results[0]["model_bytes"]
    if not results[0]["resettable"]:
        print("WARNING: /proc/self/clear_refs refused; VmHWM is the peak since the child started")

    def row(label: str, values: list[int], *, goal: bool) -> None:
        med, low = statistics.median(values), min(values)
        line = f"  {label:<44} {mib(med)} {mib(low)}   {med / size:6.2f}x {low / size:6.2f}x"
        if goal:
            line += f"   {'PASS' if med / size < GOAL else 'FAIL'} (goal < {GOAL:g}x)"
        print(line)

    print(f"\nmodel state: {size / MiB:.1f} MiB ({size:,} bytes); {len(results)} repetitions")
    print(f"  {'':<44} {'median':>7} {'min':>7}   {'ratio to model (med, min)':>15}")
    row("RSS after imports", [r["rss_imports"] for r in results], goal=False)
    row("RSS after Coordinator() built the model", [r["rss_built"] for r in results], goal=False)
    row("peak while building (VmHWM)", [r["peak_build"] for r in results], goal=False)
    row("peak during run() (VmHWM)", [r["peak_run"] for r in results], goal=False)
    row("RSS at the end of run()", [r["rss_end"] for r in results], goal=False)
    row("built model: RSS after build - after imports", [r["rss_built"] - r["rss_imports"] for r in results], goal=False)
    row("peak growth above RSS after imports", [r["peak_run"] - r["rss_imports"] for r in results], goal=True)
    row("peak growth above RSS after model built", [r["peak_run"] - r["rss_built"] for r in results], goal=True)
    row("psutil-sampled peak growth above built model", [r["psutil_peak_run"] - r["rss_built"] for r in results], goal=False)
    if results[0]["heap_built"]:
        row("malloc in use after model built (mallinfo2)", [r["heap_built"] for r in results], goal=False)
        row("malloc in use, sampled peak during run()", [r["heap_peak_run"] for r in results], goal=False)
        row("  growth above built model", [r["heap_peak_run"] - r["heap_built"] for r in results], goal=False)
    samples = [r["psutil_samples"] for r in results]
    print(f"  (psutil: {min(samples)}-{max(samples)} samples per run at {args.interval * 1e3:g} ms; it can only under-read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
