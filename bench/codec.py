"""Tensor codec speed: encode + decode of a ~100 MB float32 state, as a ratio to a plain copy of the same bytes.

    python bench/codec.py                      # three layouts, 7 repetitions each
    python bench/codec.py --reps 11 --variants 4x25MB

Two codec paths are timed, each from a state dict to a decoded state dict:

* ``msgpack``: :func:`~fedlink.protocol.tensors.encode_state` then :func:`~fedlink.protocol.tensors.decode_state`
  (one msgpack document, what files and tests use);
* ``wire``: :func:`~fedlink.protocol.tensors.iter_state_pieces` -> :func:`~fedlink.protocol.frames.encode_data`
  -> :func:`~fedlink.protocol.frames.decode_frame` -> :meth:`~fedlink.protocol.tensors.StateAssembler.feed`, chunk by
  chunk (1 MiB by default), i.e. what a session does on both ends of a transfer, minus the socket.

The baseline, ``copy``, is ``bytearray(memoryview)`` of each tensor's bytes: one plain single-threaded memcpy per
tensor into fresh memory, which is what the codec paths do too (they run in one thread). Shown beside it, for
information: ``copy-flat`` (the same bytes as one buffer, so per-tensor costs stay visible), ``clone``
(``{name: t.clone()}``, which torch runs on all its threads -- about 2x faster here with 2 cores, so it would not
be a like-for-like baseline) and ``copy-warm`` (``np.copyto`` into a buffer already touched: memcpy bandwidth
without the page faults a fresh allocation pays on first touch, which dominate every other row).

Every repetition times the baselines and both paths back to back, so they see the same conditions. glibc's mmap
threshold is pinned (``--mmap-threshold-mib``, 2 MiB by default) so that whether a buffer is fresh memory does not
depend on what the process freed before. The issue's goal: codec time at most 3x the copy, judged on the medians.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlink.protocol.frames import DataFrame, decode_frame, encode_data
from fedlink.protocol.limits import Limits, MiB
from fedlink.protocol.tensors import (
    State,
    StateAssembler,
    decode_state,
    encode_state,
    header_of,
    iter_state_chunks,
    iter_state_pieces,
)

GOAL = 3.0
VARIANTS = ("4x25MB", "1x100MB", "many-small")


def make_state(variant: str, *, total_mb: float, small_count: int) -> State:
    """A float32 state of ``total_mb`` MiB laid out as the variant says (values random, seed 0)."""
    generator = torch.Generator().manual_seed(0)
    total = int(total_mb * MiB) // 4
    if variant == "4x25MB":
        sizes = [total // 4] * 4
    elif variant == "1x100MB":
        sizes = [total]
    elif variant == "many-small":
        sizes = [total // small_count] * small_count
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return {f"layer{i}.weight": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


def machine_load() -> str:
    """The 1-minute load average against the core count: timings mean little on a busy machine."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = "  WARNING: other processes are using the CPUs; timings are inflated" if load > 0.5 * cores else ""
    return f"load average {load:.2f} on {cores} cores{note}"


def pin_malloc(threshold: int) -> bool:
    """Fix glibc's mmap threshold (and so turn off its dynamic adjustment); False where that is not possible.

    By default glibc raises the threshold each time a large mmap'd block is freed, so whether a 25 MB tensor comes
    from recycled (already touched) heap memory or from fresh pages depends on what the process freed before --
    and the ratios of one run would not repeat in the next. Pinned, every block of at least ``threshold`` bytes is
    fresh memory that pays its page faults, in the baseline and the codec alike, and smaller blocks (the 1 MiB wire
    frames) come from the heap.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2 * threshold))
    except (OSError, AttributeError):
        return False


# -- the timed operations -----------------------------------------------------------------------------------------


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def copy_bytes(views: list[memoryview]) -> dict[str, float]:
    """The baseline: ``bytearray(memoryview)`` of every tensor's bytes -- one single-threaded memcpy each."""
    started = time.perf_counter()
    out = [bytearray(view) for view in views]
    seconds = time.perf_counter() - started
    del out
    return {"total": seconds}


def copy_flat(flat: memoryview) -> dict[str, float]:
    started = time.perf_counter()
    out = bytearray(flat)
    seconds = time.perf_counter() - started
    del out
    return {"total": seconds}


def clone_tensors(state: State) -> dict[str, float]:
    """``t.clone()`` of every tensor: torch copies large tensors with all its threads (info only)."""
    started = time.perf_counter()
    out = {name: t.clone() for name, t in state.items()}
    seconds = time.perf_counter() - started
    del out
    return {"total": seconds}


def copy_warm(flat: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Into memory already touched, one thread: memcpy bandwidth alone, without a fresh allocation's page faults."""
    started = time.perf_counter()
    np.copyto(target, flat)
    return {"total": time.perf_counter() - started}


def msgpack_path(state: State) -> dict[str, float]:
    started = time.perf_counter()
    blob = encode_state(state)
    encoded = time.perf_counter()
    decoded = decode_state(blob)
    finished = time.perf_counter()
    del blob, decoded
    return {"total": finished - started, "encode": encoded - started, "decode": finished - encoded}


def wire_path(state: State, chunk_bytes: int, limits: Limits) -> dict[str, float]:
    send = receive = 0.0
    started = time.perf_counter()
    header = header_of(state)
    assembler = StateAssembler(header)
    mark = time.perf_counter()
    receive += mark - started  # allocating the assembler's first tensor is the receiver's work
    chunks = iter_state_pieces(state, header, chunk_bytes)
    seq = 0
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        if chunk is None:
            send += time.perf_counter() - t0
            break
        data = encode_data(7, seq, chunk)
        t1 = time.perf_counter()
        frame = decode_frame(data, limits)
        assert isinstance(frame, DataFrame)
        assembler.feed(frame.payload)
        t2 = time.perf_counter()
        send += t1 - t0
        receive += t2 - t1
        seq += 1
    result = assembler.result()
    finished = time.perf_counter()
    del result, assembler, data, frame
    return {"total": finished - started, "send": send, "receive": receive}


def check_round_trip(state: State, chunk_bytes: int, limits: Limits) -> None:
    """Both paths must give back exactly the input (checked once, outside the timings)."""
    decoded = decode_state(encode_state(state))
    header = header_of(state)
    assembler = StateAssembler(header)
    for seq, chunk in enumerate(iter_state_chunks(state, header, chunk_bytes)):
        frame = decode_frame(encode_data(7, seq, chunk), limits)
        assert isinstance(frame, DataFrame)
        assembler.feed(frame.payload)
    for name, tensor in state.items():
        if not (torch.equal(decoded[name], tensor) and torch.equal(assembler.result()[name], tensor)):
            raise SystemExit(f"round trip changed tensor {name!r}")


# -- running and reporting ----------------------------------------------------------------------------------------


@dataclass
class Series:
    samples: list[dict[str, float]] = field(default_factory=list)

    def values(self, part: str = "total") -> list[float]:
        return [s[part] for s in self.samples]

    def median(self, part: str = "total") -> float:
        return statistics.median(self.values(part))

    def min(self, part: str = "total") -> float:
        return min(self.values(part))


def measure(state: State, *, reps: int, warmup: int, chunk_bytes: int, limits: Limits) -> dict[str, Series]:
    views = [_bytes_of(t) for t in state.values()]
    flat = torch.cat([t.reshape(-1) for t in state.values()]).view(torch.uint8).numpy()
    target = np.zeros_like(flat)
    operations: dict[str, Callable[[], dict[str, float]]] = {
        "copy": lambda: copy_bytes(views),
        "copy-flat": lambda: copy_flat(memoryview(flat)),
        "clone": lambda: clone_tensors(state),
        "copy-warm": lambda: copy_warm(flat, target),
        "msgpack": lambda: msgpack_path(state),
        "wire": lambda: wire_path(state, chunk_bytes, limits),
    }
    series = {name: Series() for name in operations}
    for rep in range(warmup + reps):
        for name, operation in operations.items():
            gc.collect()
            sample = operation()
            if rep >= warmup:
                series[name].samples.append(sample)
    return series


def report(variant: str, state: State, series: dict[str, Series]) -> list[tuple[str, str, float]]:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    base = series["copy"]
    clone = series["clone"]
    print(f"\n{variant}: {len(state)} tensors, {nbytes / MiB:.1f} MiB float32")
    print(f"  {'path':<10} {'median ms':>10} {'min ms':>9} {'GB/s':>6}  {'x copy (med)':>12} {'x copy (min)':>12}"
          f"  {'x clone (med)':>13}  goal <= {GOAL:g}x")
    verdicts: list[tuple[str, str, float]] = []
    for name in ("copy", "copy-flat", "clone", "copy-warm", "msgpack", "wire"):
        s = series[name]
        med, low = s.median(), s.min()
        line = f"  {name:<10} {med * 1e3:>10.1f} {low * 1e3:>9.1f} {nbytes / med / 1e9:>6.2f}"
        if name in ("msgpack", "wire"):
            ratio = med / base.median()
            verdict = "PASS" if ratio <= GOAL else "FAIL"
            line += f"  {ratio:>12.2f} {low / base.min():>12.2f}  {med / clone.median():>13.2f}  {verdict}"
            verdicts.append((variant, name, ratio))
        print(line)
    m, w = series["msgpack"], series["wire"]
    print(f"  split (median ms): msgpack encode {m.median('encode') * 1e3:.1f} + decode {m.median('decode') * 1e3:.1f};"
          f" wire send {w.median('send') * 1e3:.1f} + receive {w.median('receive') * 1e3:.1f}")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (median and min shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--size-mb", type=float, default=100.0, help="state size in MiB")
    parser.add_argument("--small-count", type=int, default=10_000, help="tensors in the many-small variant")
    parser.add_argument("--chunk-mib", type=float, default=1.0, help="wire path chunk size (Limits.chunk_bytes)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--mmap-threshold-mib", type=float, default=2.0,
                        help="pin glibc's mmap threshold (0: leave glibc's dynamic threshold, runs vary more)")
    args = parser.parse_args(argv)
    pinned = args.mmap_threshold_mib > 0 and pin_malloc(int(args.mmap_threshold_mib * MiB))
    if args.threads:
        torch.set_num_threads(args.threads)

    chunk_bytes = int(args.chunk_mib * MiB)
    limits = Limits(chunk_bytes=chunk_bytes)
    print(f"fedlink codec benchmark: torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"python {sys.version.split()[0]}; chunk {chunk_bytes} bytes; {args.reps} reps (+{args.warmup} warm-up)")
    print(f"before: {machine_load()}")
    print("baseline 'copy' = bytearray(memoryview) of each tensor's bytes (fresh memory, one thread, like the codec);")
    print("'copy-flat' = the same for one flat buffer; 'clone' = {name: t.clone()} (torch uses all its threads);")
    print("'copy-warm' = np.copyto into a buffer already touched (memcpy alone, no page faults). The last three: info")
    print(f"glibc mmap threshold pinned at {args.mmap_threshold_mib:g} MiB: blocks that large are fresh, page-faulting memory"
          if pinned else "glibc mmap threshold left dynamic: fresh or recycled memory depends on the run's history")
    verdicts: list[tuple[str, str, float]] = []
    for variant in args.variants:
        state = make_state(variant, total_mb=args.size_mb, small_count=args.small_count)
        check_round_trip(state, chunk_bytes, limits)
        series = measure(state, reps=args.reps, warmup=args.warmup, chunk_bytes=chunk_bytes, limits=limits)
        verdicts += report(variant, state, series)
        del state, series
        gc.collect()

    print(f"after:  {machine_load()}")
    print(f"\nsummary (median codec time / median copy time, goal <= {GOAL:g}x):")
    for variant, path, ratio in verdicts:
        print(f"  {variant:<11} {path:<8} {ratio:5.2f}x  {'PASS' if ratio <= GOAL else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
