"""``fl-coordinator``: train, simulate, split, demo. Each command parses, builds a config and calls one entry point."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console

from fedlink.collector import freeze_startup, tune_for_daemon
from fedlink.errors import FedlinkError
from fedlink.shards import load_shard, save_shard

from . import split as splitting
from .certs import certs
from .config import load_config
from .coordinator import Coordinator
from .observers import run_observers
from .progress import make_progress

__all__ = ["main"]


def _logging(level: str) -> None:
    # force: a library may have configured logging when it was imported (opacus does, at WARNING)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def _privacy_summary(record: dict[str, Any]) -> str:
    """``; epsilon 3.21 (delta 1e-05)`` for a run with a privacy ledger, else nothing."""
    eps = record.get("epsilon")
    return f"; epsilon {eps:.3f} (delta {record.get('delta', 0):g})" if eps is not None else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Coordinate federated training across fedlink workers."""


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the last completed round of OUTPUT/checkpoint.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning")
def train(config_path: Path, resume: bool, log_level: str) -> None:
    """Run the federated training job described by CONFIG (YAML)."""
    _logging(log_level)
    tune_for_daemon()
    console = Console(stderr=True)
    try:
        config = load_config(config_path)
        # Exporters (metrics:, output.tensorboard) first, then the live table; see server/observers.py.
        with run_observers(config, make_progress(console), announce=lambda line: click.echo(line, err=True)) as progress:
            coordinator = Coordinator(config, progress=progress)
            freeze_startup()  # what exists now lives for the whole run: later collections need not walk it
            progress.bind(coordinator)
            history = asyncio.run(coordinator.run(resume=resume))
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    if coordinator.stopped is not None:
        click.echo(f"stopped early: {coordinator.stopped}")
    if not history:
        click.echo("no round ran")
        return
    last = history[-1]
    acc = last.get("accuracy")
    click.echo(
        (f"finished {len(history)} rounds; final accuracy {acc:.4f}" if acc is not None else f"finished {len(history)} rounds")
        + _privacy_summary(last)
    )
    click.echo(f"metrics: {config.output / 'metrics.jsonl'}\nmodel:   {config.output / 'model.safetensors'}")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the last completed round of OUTPUT/checkpoint.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning")
def simulate(config_path: Path, resume: bool, log_level: str) -> None:
    """Run CONFIG's job over virtual workers (its simulation: section) on this machine or a Ray cluster."""
    from .simulation.run import SimulationDisplay, simulate_async

    _logging(log_level)
    tune_for_daemon()
    console = Console(stderr=True)
    try:
        config = load_config(config_path)
        if config.simulation is None:
            raise click.UsageError(f"{config_path} has no simulation: section; fl-coordinator train runs real workers")
        display = SimulationDisplay(make_progress(console), show_workers=config.simulation.workers <= 32)
        with run_observers(config, display, announce=lambda line: click.echo(line, err=True)) as progress:
            history = asyncio.run(simulate_async(config, progress=progress, resume=resume))
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    if not history:
        click.echo("no round ran")
        return
    last = history[-1]
    acc = last.get("accuracy")
    updates = sum(r.get("workers", 0) for r in history)
    seconds = sum(r.get("round_seconds", 0.0) for r in history)
    click.echo(
        f"finished {len(history)} rounds" + (f"; final accuracy {acc:.4f}" if acc is not None else "")
        + _privacy_summary(last)
        + (f"; {updates / seconds:.1f} client updates per second" if seconds > 0 else "")
    )
    click.echo(f"metrics: {config.output / 'metrics.jsonl'}\nmodel:   {config.output / 'model.safetensors'}")


@main.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workers", "n_workers", type=click.IntRange(1, 100_000), required=True, help="Number of shards.")
@click.option("--iid", "mode", flag_value="iid", default=True, help="Uniform random split (default).")
@click.option("--dirichlet", "alpha", type=click.FloatRange(min=0, min_open=True), default=None, help="Label skew: Dirichlet(ALPHA) class proportions per worker.")
@click.option("--classes-per-worker", "classes", type=click.IntRange(min=1), default=None, help="Pathological split: each worker holds K label-sorted shards.")
@click.option("--quantity", "quantity", type=click.FloatRange(min=0, min_open=True), default=None, help="Quantity skew: Dirichlet(ALPHA) shard sizes, IID content.")
@click.option("--seed", type=int, default=0)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
def split(data: Path, n_workers: int, mode: str, alpha: float | None, classes: int | None, quantity: float | None, seed: int, out: Path) -> None:
    """Split DATA (a shard-format file) into --workers shards DIR/shard-0.npy ... and DIR/summary.json."""
    chosen = [name for name, value in (("--dirichlet", alpha), ("--classes-per-worker", classes), ("--quantity", quantity)) if value is not None]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one way to split, not {' and '.join(chosen)}")
    try:
        shard = load_shard(data)
        rng = np.random.default_rng(seed)
        if alpha is not None:
            parts = splitting.partition_dirichlet(shard.y, n_workers, alpha, rng)
        elif classes is not None:
            parts = splitting.partition_classes(shard.y, n_workers, classes, rng)
        elif quantity is not None:
            parts = splitting.partition_quantity(len(shard.y), n_workers, quantity, rng)
        else:
            parts = splitting.partition_iid(len(shard.y), n_workers, rng)
        out.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(parts):
            save_shard(out / f"shard-{i}.npy", shard.x[part], shard.y[part])
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    summary = splitting.summarize(shard.y, parts)
    (out / "summary.json").write_text(json.dumps({"source": str(data), "seed": seed, "shards": summary}, indent=2) + "\n")
    for row in summary:
        click.echo(f"shard-{row['shard']}.npy: {row['samples']} samples, labels {row['labels']}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The PNG to write; the table goes beside it as .md.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write one self-contained HTML page: curves, workers, drops, configs.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write TensorBoard events, one folder per RUN under this one.")
@click.option("--target", type=click.FloatRange(0, 1), default=None, help="Also report the first round reaching this accuracy.")
@click.option("--title", default="", help="Title of the plot.")
def report(
    runs: tuple[Path, ...], out: Path | None, html_out: Path | None, tensorboard_dir: Path | None,
    target: float | None, title: str,
) -> None:
    """Plot accuracy and loss per round of one or several RUN folders, and write a markdown table."""
    from .report import load_run, markdown_table, plot_runs  # matplotlib is needed only here

    if out is None and html_out is None and tensorboard_dir is None:
        raise click.UsageError("say what to write: --out PNG, --html PAGE and/or --tensorboard DIR")
    try:
        loaded = [load_run(folder) for folder in runs]
        if html_out is not None:
            from .html_report import write_html

            click.echo(f"html: {write_html(runs, html_out, title=title)}")
        if tensorboard_dir is not None:
            from .tensorboard import convert_run

            for folder, run in zip(runs, loaded):
                rounds = convert_run(folder, tensorboard_dir / run.name)
                click.echo(f"tensorboard: {tensorboard_dir / run.name} ({rounds} rounds)")
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    if out is None:
        return
    plot_runs(loaded, out, title=title)
    table = markdown_table(loaded, target=target)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    click.echo(table, nl=False)
    click.echo(f"plot: {out}\ntable: {out.with_suffix('.md')}")


@main.command()
@click.option("--rounds", type=click.IntRange(1, 1000), default=5)
@click.option("--workers", "n_workers", type=click.IntRange(1, 16), default=3)
@click.option("--seed", type=int, default=0)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning")
def demo(rounds: int, n_workers: int, seed: int, out: Path, log_level: str) -> None:
    """Start local workers on loopback with shards of scikit-learn's digits, and train a few FedAvg rounds."""
    from .demo import run_demo  # scikit-learn is needed only here

    _logging(log_level)
    tune_for_daemon()
    console = Console(stderr=True)
    try:
        with make_progress(console) as progress:
            result = run_demo(out, workers=n_workers, rounds=rounds, seed=seed, progress=progress)
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"demo finished: test accuracy {result.accuracy:.2%} after {rounds} rounds ({n_workers} workers)")
    click.echo(f"metrics: {out / 'metrics.jsonl'}\nmodel:   {out / 'model.safetensors'}")


main.add_command(certs)  # server/certs.py: a development CA and certificates for TLS


if __name__ == "__main__":  # pragma: no cover
    main()
