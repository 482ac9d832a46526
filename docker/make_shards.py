"""Write the compose demo's data: one digits shard per worker and the coordinator's held-out set.

The ``data`` service of docker-compose.yml runs this once; each destination lies in a volume that only its
owner mounts, so a worker container sees its own shard and nothing else::

    python docker/make_shards.py --seed 0 --test /shards/coordinator/test.npy \\
        /shards/worker-1/shard.npy /shards/worker-2/shard.npy /shards/worker-3/shard.npy

The split is the one ``fl-coordinator demo`` uses (:func:`fedlink.server.demo.prepare_demo_data`): as many IID
shards as destinations are given, and 297 held-out digits. Every file is written beside its destination and
renamed into place, so a reader never sees half a shard, and a rerun with the same seed writes the same data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fedlink.errors import FedlinkError
from fedlink.server.demo import prepare_demo_data

__all__ = ["build_parser", "main", "make_shards"]


def make_shards(shards: list[Path], *, test: Path, seed: int) -> None:
    """Split the digits over ``len(shards)`` workers and put each file at its destination."""
    with tempfile.TemporaryDirectory(prefix="fedlink-shards-") as scratch:
        made, held_out = prepare_demo_data(Path(scratch), workers=len(shards), seed=seed)
        for source, destination in (*zip(made, shards), (held_out, test)):
            _place(source, destination)


def _place(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.copyfile(source, partial)  # the scratch folder may be on another file system than the volume
    os.replace(partial, destination)


def _shard_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".npy":
        raise argparse.ArgumentTypeError(f"{text}: shards are written as .npy files")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", type=_shard_path, metavar="SHARD", help="one destination per worker")
    parser.add_argument("--test", required=True, type=_shard_path, help="destination of the held-out set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the split")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    destinations = [*args.shards, args.test]
    if len(set(destinations)) != len(destinations):
        parser.error("every destination must be a different file")
    try:
        make_shards(args.shards, test=args.test, seed=args.seed)
    except (FedlinkError, OSError) as exc:
        print(f"make_shards: {exc}", file=sys.stderr)
        return 1
    for path in destinations:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
