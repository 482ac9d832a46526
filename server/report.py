"""``fl-coordinator report``: accuracy and loss per round of one or several runs, as a PNG and a markdown table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlink.errors import DataError

__all__ = ["Run", "load_run", "markdown_table", "plot_runs", "rounds_to"]


@dataclass(frozen=True)
class Run:
    name: str
    records: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["round"], r[key]) for r in self.records if r.get(key) is not None]
        return [p[0] for p in points], [float(p[1]) for p in points]


def load_run(folder: Path) -> Run:
    path = folder / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; is {folder} a run's output folder?") from exc
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
        if not isinstance(record, dict) or "round" not in record:
            raise DataError(f"{path}:{number}: a metrics record needs a 'round' key")
        records.append(record)
    if not records:
        raise DataError(f"{path} has no rounds yet")
    return Run(name=folder.name, records=records)


def rounds_to(run: Run, target: float, key: str = "accuracy") -> int | None:
    """The first round whose ``key`` reached ``target``, or None."""
    return next((r["round"] for r in run.records if r.get(key) is not None and r[key] >= target), None)


def markdown_table(runs: list[Run], *, target: float | None = None) -> str:
    header = ["run", "rounds", "final accuracy", "best accuracy", "final loss"]
    if target is not None:
        header.append(f"rounds to {target:.0%}")
    has_auc = any(r.series("roc_auc")[1] for r in runs)
    if has_auc:
        header.append("final ROC AUC")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        _, acc = run.series("accuracy")
        _, loss = run.series("loss")
        row = [
            run.name,
            str(run.records[-1]["round"]),
            f"{acc[-1]:.4f}" if acc else "-",
            f"{max(acc):.4f}" if acc else "-",
            f"{loss[-1]:.4f}" if loss else "-",
        ]
        if target is not None:
            reached = rounds_to(run, target)
            row.append(str(reached) if reached is not None else f"not in {run.records[-1]['round']}")
        if has_auc:
            _, auc = run.series("roc_auc")
            row.append(f"{auc[-1]:.4f}" if auc else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def line_styles(count: int, colours: list[str]) -> list[dict[str, str]]:
    """One ``color``/``linestyle`` pair per run, all different for up to 3 x ``len(colours)`` runs.

    matplotlib's default cycle has 10 colours, so an 11th run would look like the first; the line style changes
    with each pass through the colours instead.
    """
    styles = ("-", "--", ":")
    return [
        {"color": colours[i % len(colours)], "linestyle": styles[(i // len(colours)) % len(styles)]}
        for i in range(count)
    ]


def plot_runs(runs: list[Run], out: Path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for run, style in zip(runs, line_styles(len(runs), colours)):
        left.plot(*run.series("accuracy"), marker="o", markersize=2.5, label=run.name, **style)
        right.plot(*run.series("loss"), marker="o", markersize=2.5, label=run.name, **style)
    left.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    right.set(xlabel="round", ylabel="test loss", title="loss", yscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
