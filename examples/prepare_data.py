"""Write the shards and held-out sets the examples use, from the public data sets.

    python examples/prepare_data.py mnist --workers 3 --out examples/mnist-iid/data
    python examples/prepare_data.py mnist --workers 10 --classes-per-worker 2 --out examples/mnist-noniid/data
    python examples/prepare_data.py sms --workers 2 --out examples/sms-spam/data
    python examples/prepare_data.py digits --workers 3 --out examples/digits/data

MNIST: the first 8,000 images of the MNIST test set (t10k-*) are the federated training pool, the last 2,000 the
held-out set. SMS spam: the first 80% of messages (file order) are split over the workers, the last 20% are the
held-out set. Digits: scikit-learn's bundled 1,797 images, 297 shuffled out as the held-out set (no download).
MNIST and SMS spam are read from ``$FEDLINK_SHARED_DATA`` or ``../shared/data``; get it from the public sources:
MNIST from http://yann.lecun.com/exdb/mnist/ and the SMS Spam Collection from the UCI Machine Learning Repository.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from fedlink.datasets import load_digits, load_mnist, load_sms_spam, shared_data_dir
from fedlink.server import split as splitting
from fedlink.shards import save_shard


def _source(root: Path | None, name: str) -> Path:
    base = root or shared_data_dir()
    if base is None or not (base / name).exists():
        raise click.ClickException(
            f"cannot find {name}/ under {base or '../shared/data'}; set FEDLINK_SHARED_DATA or pass --root"
        )
    return base / name


def write(out: Path, x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, parts: list[np.ndarray], source: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        save_shard(out / f"shard-{i}.npy", x[part], y[part])
    save_shard(out / "test.npy", test_x, test_y)
    summary = splitting.summarize(y, parts)
    (out / "summary.json").write_text(json.dumps({"source": source, "shards": summary}, indent=2) + "\n")
    for row in summary:
        click.echo(f"shard-{row['shard']}.npy: {row['samples']} samples, labels {row['labels']}")
    click.echo(f"test.npy: {len(test_y)} samples")


def split(y: np.ndarray, workers: int, seed: int, classes: int | None, alpha: float | None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if classes is not None:
        return splitting.partition_classes(y, workers, classes, rng)
    if alpha is not None:
        return splitting.partition_dirichlet(y, workers, alpha, rng)
    return splitting.partition_iid(len(y), workers, rng)


@click.group()
def main() -> None:
    """Prepare example data."""


@main.command()
@click.option("--workers", type=int, default=3)
@click.option("--classes-per-worker", "classes", type=int, default=None)
@click.option("--dirichlet", "alpha", type=float, default=None)
@click.option("--seed", type=int, default=0)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def mnist(workers: int, classes: int | None, alpha: float | None, seed: int, root: Path | None, out: Path) -> None:
    x, y = load_mnist(_source(root, "mnist"))
    train_x, train_y, test_x, test_y = x[:8000], y[:8000], x[8000:], y[8000:]
    write(out, train_x, train_y, test_x, test_y, split(train_y, workers, seed, classes, alpha), "mnist t10k")


@main.command()
@click.option("--workers", type=int, default=2)
@click.option("--seq-len", type=int, default=60)
@click.option("--vocab-size", type=int, default=20000)
@click.option("--seed", type=int, default=0)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def sms(workers: int, seq_len: int, vocab_size: int, seed: int, root: Path | None, out: Path) -> None:
    x, y = load_sms_spam(_source(root, "sms_spam") / "SMSSpamCollection", seq_len=seq_len, vocab_size=vocab_size)
    cut = int(len(y) * 0.8)
    train_x, train_y, test_x, test_y = x[:cut], y[:cut], x[cut:], y[cut:]
    # The reference tutorial splits the training 80% in two halves, in file order.
    parts = [np.asarray(p, dtype=np.int64) for p in np.array_split(np.arange(cut), workers)]
    write(out, train_x, train_y, test_x, test_y, parts, "SMSSpamCollection")


@main.command()
@click.option("--workers", type=int, default=3)
@click.option("--dirichlet", "alpha", type=float, default=None)
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def digits(workers: int, alpha: float | None, seed: int, out: Path) -> None:
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:297], order[297:]
    write(out, x[train], y[train], x[test], y[test], split(y[train], workers, seed, None, alpha), "sklearn digits")


if __name__ == "__main__":
    sys.exit(main())
