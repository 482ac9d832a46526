"""Top-k 1% on the pathological non-IID MNIST job, in plain PyTorch: the scheme fedlink ships beside variants of it.

    python bench/topk_variants.py [--variants none topk dense-small ...] [--seeds 3] [--rounds 50] [--jobs 2]

The same job as ``bench/compression.py``'s non-IID half (10 workers x 2 classes, 5 a round, one epoch of SGD 0.05,
batch 16, FedAvg of deltas), replayed without sockets or processes so that a variant of the aggregation or of the
worker's selection costs about a minute a seed to try. Its figures are close to the real job's, not equal (other
sampling and shuffling draws): compare variants here, then measure the chosen one with ``bench/compression.py``.

Variants (every ``topk`` one keeps an error-feedback residual per worker, as the ``compress`` hook does):

- ``none``: dense FedAvg.
- ``topk``: per-tensor top-1%, every tensor sparse (``dense_below: 0``).
- ``dense-small``: as ``topk``, tensors under 4,096 entries dense (the default, ``dense_below: 4096``).
- ``global``: one top-1% over all tensors of at least 4,096 entries together, smaller ones dense.
- ``count``: as ``topk``, each coordinate divided by the weight of the workers that sent it rather than by all.
- ``hint``: as ``dense-small``, half of each tensor's entries taken where the last global update was largest.
- ``start-residual``: as ``dense-small``, local training starting from the global model plus the residual.
- ``per-row``: as ``dense-small``, the 1% taken in every row of a matrix (each output unit gets its share).
- ``half-residual``: as ``dense-small``, the residual halved before it is added (older error counts less).
- ``ef21``: as ``dense-small`` but without a residual: the worker sends the top-k of its update minus its last
  estimate, and both sides add that to the estimate, which is what is averaged (EF21, Richtarik et al. 2021).
- ``sqrt-share``: as ``dense-small`` with the same number of entries in all, shared among the sparse tensors in
  proportion to the square root of their sizes (the convolution gets 5x its 1%, the dense layer a little less).
- ``dense-conv``: a diagnostic, not a candidate: every tensor under 100,000 entries dense, the convolutions too,
  so that only the first dense layer is sparse. It sends 10.8% of the bytes, over the 3% budget; it shows how much
  of the loss the sparse convolution accounts for.

Prints each run's final held-out accuracy and a table of means over the seeds. Needs ``../shared/data`` (MNIST).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlink.models import mnist_cnn
from fedlink.shards import load_shard

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("none", "topk", "dense-small", "global", "count", "hint", "start-residual", "per-row", "half-residual",
            "ef21", "sqrt-share", "dense-conv")
RATIO, DENSE_BELOW, WORKERS, PER_ROUND = 0.01, 4096, 10, 5
State = dict[str, torch.Tensor]


def prepare(out: Path) -> Path:
    if not (out / "test.npy").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "prepare_data.py"), "mnist", "--workers", str(WORKERS),
             "--classes-per-worker", "2", "--out", str(out)],
            check=True, capture_output=True,
        )
    return out


class Replica:
    """One run: the global state, each worker's residual, and the last global update (for ``hint``)."""

    def __init__(self, variant: str, seed: int, data: Path) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.variant, self.seed = variant, seed
        self.rng = np.random.default_rng(seed)
        self.shards = [load_shard(data / f"shard-{i}.npy").to_tensors() for i in range(WORKERS)]
        self.test = load_shard(data / "test.npy").to_tensors()
        self.model = mnist_cnn()
        self.state: State = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.residuals: list[State] = [{} for _ in range(WORKERS)]
        self.last_update: State = {}
        self.estimates: list[State] = [{} for _ in range(WORKERS)]

    def train(self, worker: int, server_round: int) -> State:
        start = self.state
        residual = self.residuals[worker]
        if self.variant == "start-residual" and residual:
            start = {k: v + residual[k].view(v.shape) if k in residual else v for k, v in start.items()}
            self.residuals[worker] = {}
        self.model.load_state_dict(start)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        x, y = self.shards[worker]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed * 1000 + server_round * 10 + worker))
        for first in range(0, len(y), 16):
            batch = order[first : first + 16]
            optimizer.zero_grad()
            F.cross_entropy(self.model(x[batch]), y[batch]).backward()
            optimizer.step()
        return {k: v - self.state[k] for k, v in self.model.state_dict().items()}

    def _dense(self, numel: int) -> bool:
        small = {"topk": 0, "count": 0, "dense-conv": 100_000}.get(self.variant, DENSE_BELOW)
        return numel < small or 2 * math.ceil(RATIO * numel) >= numel

    def sparsify(self, worker: int, delta: State) -> State:
        residual = self.residuals[worker]
        carry = 0.5 if self.variant == "half-residual" else 1.0
        total = {k: v.flatten() + carry * residual[k] if k in residual else v.flatten() for k, v in delta.items()}
        sent = {k: torch.zeros_like(v) for k, v in total.items()}
        large = [k for k, v in total.items() if not self._dense(v.numel())]
        for k in total.keys() - set(large):
            sent[k] = total[k]
        if self.variant == "global" and large:
            flat = torch.cat([total[k] for k in large])
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[torch.topk(flat.abs(), math.ceil(RATIO * flat.numel())).indices] = True
            for k, mask in zip(large, chosen.split([total[k].numel() for k in large])):
                sent[k] = torch.where(mask, total[k], 0.0)
        else:
            counts = {k: math.ceil(RATIO * total[k].numel()) for k in large}
            if self.variant == "sqrt-share":
                roots = {k: math.sqrt(total[k].numel()) for k in large}
                counts = {k: min(total[k].numel(), max(1, round(sum(counts.values()) * roots[k] / sum(roots.values()))))
                          for k in large}
            for k in large:
                count = counts[k]
                score = total[k].abs()
                index = torch.empty(0, dtype=torch.long)
                if self.variant == "per-row" and delta[k].dim() >= 2:
                    rows = total[k].view(delta[k].shape[0], -1)
                    per_row = math.ceil(RATIO * rows.shape[1])
                    chosen = torch.topk(rows.abs(), per_row, dim=1).indices
                    index = (chosen + torch.arange(rows.shape[0]).unsqueeze(1) * rows.shape[1]).flatten()
                    sent[k][index] = total[k][index]
                    continue
                if self.variant == "hint" and k in self.last_update:
                    index = torch.topk(self.last_update[k].flatten().abs(), count // 2).indices
                    score = score.clone()
                    score[index] = -1.0
                index = torch.cat([index, torch.topk(score, count - len(index)).indices])
                sent[k][index] = total[k][index]
        self.residuals[worker] = {k: total[k] - sent[k] for k in large}
        return {k: sent[k].view(delta[k].shape) for k in delta}

    def round(self, server_round: int) -> None:
        total = {k: torch.zeros_like(v) for k, v in self.state.items()}
        senders = {k: torch.zeros_like(v) for k, v in self.state.items()}
        weight = 0
        for worker in (int(w) for w in self.rng.choice(WORKERS, PER_ROUND, replace=False)):
            update = self.train(worker, server_round)
            if self.variant == "ef21":
                estimate = self.estimates[worker]
                change = self.sparsify(worker, {k: v - estimate[k] if k in estimate else v for k, v in update.items()})
                self.residuals[worker] = {}
                update = self.estimates[worker] = {k: estimate[k] + v if k in estimate else v for k, v in change.items()}
            elif self.variant != "none":
                update = self.sparsify(worker, update)
            samples = len(self.shards[worker][1])
            for k in total:
                total[k] += samples * update[k]
                senders[k] += samples * (update[k] != 0)
            weight += samples
        for k in self.state:
            if self.variant == "count":
                step = torch.where(senders[k] > 0, total[k] / senders[k].clamp(min=1), 0.0)
            else:
                step = total[k] / weight
            self.last_update[k] = step
            self.state[k] = self.state[k] + step

    def accuracy(self) -> float:
        self.model.load_state_dict(self.state)
        x, y = self.test
        with torch.no_grad():
            return float((self.model(x).argmax(1) == y).float().mean())


def run(variant: str, seed: int, rounds: int, data: Path) -> tuple[str, int, float]:
    replica = Replica(variant, seed, data)
    for server_round in range(1, rounds + 1):
        replica.round(server_round)
    accuracy = replica.accuracy()
    print(f"{variant} seed {seed}: {accuracy:.2%} after {rounds} rounds", flush=True)
    return variant, seed, accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["none", "topk", "dense-small"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/topk_variants"))
    args = parser.parse_args()
    data = prepare(args.out / "data")
    runs = [(v, s) for s in range(args.seeds) for v in args.variants]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, *zip(*runs), [args.rounds] * len(runs), [data] * len(runs)))
    print(f"\n| variant | final accuracy, mean of {args.seeds} seeds | per seed |\n|---|---:|---|")
    for variant in args.variants:
        finals = [a for v, _, a in results if v == variant]
        print(f"| {variant} | {sum(finals) / len(finals):.2%} | {', '.join(f'{a:.2%}' for a in finals)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
