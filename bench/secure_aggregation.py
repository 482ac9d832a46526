"""Secure aggregation costs, side by side with plain FedAvg on the same job (in-process, no network).

    python bench/secure_aggregation.py                 # every figure; 100 MB at n = 50 run at 1/10 size, scaled
    python bench/secure_aggregation.py --full          # also mask all 50 workers of the 100 MB job
    python bench/secure_aggregation.py --quick         # MNIST CNN only
    python bench/secure_aggregation.py --flower-python /path/to/venv-with-flwr/bin/python

Figures:

* Shamir: time to share one 32-byte key among k = 51 holders (threshold 26) and to rebuild it. Goal <= 2 ms each.
* Mask expansion: ChaCha20 keystream into uint32 values (``expand``) and added in place (``add_mask``), in MB/s of
  mask. Goal >= 500 MB/s.
* Upload: packed masked vector bytes against float32 for the MNIST CNN (225,034 parameters), at several ``bits``.
  Goal <= bits/32 of float32.
* Round overhead at n = 10 and 50 workers for the MNIST CNN and a 100 MB model (25M parameters): time of each
  protocol stage, summed over the in-process workers and divided by n (a worker's own cost; workers run in
  parallel in a real federation), and the coordinator's time; beside it plain FedAvg's coordinator work on the
  same job (a weighted fold of n float32 updates). Quantisation (clip, stochastic rounding) is timed once per
  model. For the 100 MB model at n = 50, masking every worker in one process costs 50 x 50 x 100 MB of keystream
  (minutes on two cores); unless ``--full`` is given, that round runs at a tenth of the size and the stages that
  touch the vector (masking, the coordinator's folding and unmasking) are scaled by ten, as the figures say.

With ``--flower-python`` (an interpreter that has ``flwr`` installed; kept out of fedlink's own environment),
Flower's SecAgg+ primitives are timed on the same sizes and printed beside ours: its Shamir over GF(2^128)
chunks on the PEM private key its mod shares, and its mask generator (numpy's Mersenne Twister seeded with a
32-bit fold of the seed). Its full workflow needs Flower's own runtime and is not run here.

Every sum from a full run is checked against the plain sum of the contributors' vectors, so the figures come from
a protocol that works. One worker drops after sending its masked input in every run (its self mask is rebuilt),
and one before, so the dropout paths are in the timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fedlink.models import mnist_cnn
from fedlink.secagg import bitpack, prg, shamir
from fedlink.secagg.params import resolve_params
from fedlink.secagg.quantize import QuantSpec, encode_update, layout_of
from fedlink.secagg.server import ServerSecAgg
from fedlink.secagg.worker import WorkerSecAgg

MB = 1e6


def machine_load() -> str:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = "  WARNING: other processes are using the CPUs; timings are inflated" if load > 0.5 * cores else ""
    return f"load average {load:.2f} on {cores} cores{note}"


def best_of(reps: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_shamir() -> None:
    secret = int.from_bytes(os.urandom(32), "big")
    shares = shamir.split(secret, threshold=26, indices=range(1, 52))
    split = statistics.median(best_of(5, lambda: shamir.split(secret, threshold=26, indices=range(1, 52))) for _ in range(5))
    rebuild = statistics.median(best_of(5, lambda: shamir.rebuild(shares[10:36], threshold=26)) for _ in range(5))
    assert shamir.rebuild(shares[10:36], threshold=26) == secret
    print(f"shamir k=51 t=26, one 32-byte key: share {split * 1e3:.3f} ms, rebuild {rebuild * 1e3:.3f} ms (goal <= 2 ms)")


def bench_prg() -> None:
    words = 25_000_000
    vector = np.zeros(words, dtype=np.uint32)
    expand = best_of(3, lambda: prg.expand(b"\x07" * 32, words))
    add = best_of(3, lambda: prg.add_mask(vector, b"\x07" * 32))
    print(f"mask expansion, 100 MB: expand {4 * words / MB / expand:,.0f} MB/s, add in place {4 * words / MB / add:,.0f} MB/s "
          "(goal >= 500 MB/s)")  # fmt: skip


def bench_upload(params: int) -> None:
    length = params + 2  # weight and one metric
    float32 = 4 * params
    cells = ", ".join(
        f"{bits} bits {bitpack.packed_size(length, bits):,} B ({bitpack.packed_size(length, bits) / float32:.3f}x)"
        for bits in (32, 24, 20, 16)
    )
    print(f"upload per worker, MNIST CNN ({params:,} params; float32 {float32:,} B): {cells}")


class Clock:
    """Adds the time spent inside ``with clock(key):`` blocks to ``clock.seconds[key]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._key = ""
        self._start = 0.0

    def __call__(self, key: str) -> Clock:
        self._key = key
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._key] = self.seconds.get(self._key, 0.0) + time.perf_counter() - self._start


def run_round(n: int, length: int) -> dict[str, float]:
    """One secure round with in-process workers; seconds per stage (per worker) and for the coordinator."""
    ids = [f"w{i:02d}" for i in range(n)]
    params = resolve_params(num_selected=n, length=length, bits=32)
    server = ServerSecAgg(round=0, params=params, selected=ids)
    workers: dict[str, WorkerSecAgg] = {}
    lost_before, lost_after = ids[-1], ids[-2]
    rng = np.random.default_rng(0)  # benchmark inputs, not secrets
    clock = Clock()
    expected = np.zeros(length, dtype=np.uint32)

    request = server.advertise_request()
    for w in ids:
        with clock("advertise"):  # key generation happens when the worker's round state is created
            workers[w] = WorkerSecAgg(w, round=0)
            advertised = workers[w].advertise(request)
        with clock("coordinator"):
            server.receive_advertise(w, advertised)
    with clock("coordinator"):
        share_requests = server.share_keys_requests()
    for w, share_request in share_requests.items():
        with clock("share_keys"):
            shared = workers[w].share_keys(share_request)
        with clock("coordinator"):
            server.receive_shares(w, shared)
    with clock("coordinator"):
        masked_requests = server.masked_input_requests()
    masked = 0
    for w, masked_request in masked_requests.items():
        if w == lost_before:
            continue
        vector = rng.integers(0, 1 << 32, length, dtype=np.uint64).astype(np.uint32)
        np.add(expected, vector, out=expected)
        with clock("masked_input"):
            header, packed = workers[w].masked_input(masked_request, vector)
        del vector
        masked += 1
        with clock("coordinator"):
            server.receive_masked(w, header, packed)
    with clock("coordinator"):
        unmask_requests = server.unmask_requests()
    for w, unmask_request in unmask_requests.items():
        if w == lost_after:
            continue
        with clock("unmask"):
            answer = workers[w].unmask(unmask_request)
        with clock("coordinator"):
            server.receive_unmask(w, answer)
    with clock("coordinator"):
        total = server.finish()
    assert np.array_equal(total, expected), "the unmasked sum differs from the plain sum"
    out = {stage: seconds / (masked if stage == "masked_input" else n) for stage, seconds in clock.seconds.items()}
    return out | {"coordinator": clock.seconds["coordinator"]}


def plain_fedavg(n: int, params: int) -> float:
    """The coordinator's fold of n float32 updates into a weighted mean (what plain FedAvg does per round)."""
    update = np.random.default_rng(1).standard_normal(params, dtype=np.float32)
    total = np.zeros(params, dtype=np.float32)

    def fold() -> None:
        total.fill(0)
        for i in range(n):
            np.add(total, np.float32(i + 1) * update, out=total)
        np.divide(total, np.float32(n * (n + 1) / 2), out=total)

    return best_of(2, fold)


def bench_quantize(params: int) -> float:
    state = {"x": torch.randn(params) * 0.01}
    layout = layout_of(state, metrics=("loss",))
    spec = QuantSpec.for_workers(50, bits=32, clip_norm=10.0, weight_cap=1000)
    return best_of(2, lambda: encode_update(state, num_samples=500, metrics={"loss": 1.0}, layout=layout, spec=spec))


def bench_rounds(models: list[tuple[str, int]], sizes: list[int], full: bool) -> None:
    print("\nround overhead (seconds; per worker = that worker's own compute, coordinator = all of its work)")
    header = f"{'model':<12}{'n':>4}  {'advertise':>9} {'share':>8} {'mask':>8} {'unmask':>8}  {'coordinator':>11}  {'plain FedAvg':>12}  note"
    print(header)
    for name, params in models:
        quantise = bench_quantize(params)
        for n in sizes:
            scale = 10 if not full and params > 10_000_000 and n > 10 else 1
            t = run_round(n, params // scale + 2)
            if scale > 1:  # stages that touch the vector grow linearly with its length; key handling does not
                t = t | {key: t[key] * scale for key in ("masked_input", "coordinator")}
            note = "sum checked exactly" + (f"; run at 1/{scale} of the size, mask and coordinator x{scale}" if scale > 1 else "")
            print(
                f"{name:<12}{n:>4}  {t['advertise']:>9.4f} {t['share_keys']:>8.4f} {t['masked_input']:>8.3f} "
                f"{t['unmask']:>8.4f}  {t['coordinator']:>11.3f}  {plain_fedavg(n, params):>12.3f}  {note}"
            )
        print(f"{'':<12}     + quantise one update (clip, stochastic rounding): {quantise:.3f} s per worker")


FLOWER_SNIPPET = """
import json, os, sys, time
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes
key = private_key_to_bytes(generate_key_pairs()[0])
def best(fn, reps=3):
    out = []
    for _ in range(reps):
        start = time.perf_counter(); fn(); out.append(time.perf_counter() - start)
    return min(out)
shares = create_shares(key, 26, 51)
assert combine_shares(shares[10:36]) == key
params = int(sys.argv[1])
print(json.dumps({
    "key_bytes": len(key),
    "share": best(lambda: create_shares(key, 26, 51)),
    "rebuild": best(lambda: combine_shares(shares[10:36])),
    "mask_mb_s": 4 * params / 1e6 / best(lambda: pseudo_rand_gen(os.urandom(32), 1 << 32, [(params,)])),
}))
"""


def bench_flower(python: str, params: int) -> None:
    import json
    import subprocess

    done = subprocess.run([python, "-c", FLOWER_SNIPPET, str(params)], capture_output=True, text=True, timeout=600)
    if done.returncode:
        print(f"flower: could not run ({done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode})")
        return
    f = json.loads(done.stdout)
    print(
        f"flower SecAgg+ primitives: share one {f['key_bytes']}-byte PEM key k=51 t=26 {f['share'] * 1e3:,.1f} ms, "
        f"rebuild {f['rebuild'] * 1e3:,.1f} ms; mask generation (Mersenne Twister, {params:,} values) "
        f"{f['mask_mb_s']:,.0f} MB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="mask every worker of the 100 MB job at n = 50")
    parser.add_argument("--quick", action="store_true", help="the MNIST CNN only")
    parser.add_argument("--flower-python", help="an interpreter with flwr installed: time Flower's primitives too")
    args = parser.parse_args()
    print(machine_load())
    cnn = sum(p.numel() for p in mnist_cnn().state_dict().values())
    bench_shamir()
    bench_prg()
    if args.flower_python:
        bench_flower(args.flower_python, cnn)
    bench_upload(cnn)
    models = [("mnist_cnn", cnn)] + ([] if args.quick else [("100MB", 25_000_000)])
    bench_rounds(models, [10, 50], args.full)


if __name__ == "__main__":
    main()
