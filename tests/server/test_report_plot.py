"""The comparison plot of ``fl-coordinator report``: every run stays distinguishable, however many there are."""

from __future__ import annotations

import json
from pathlib import Path

from fedlink.server.report import line_styles, load_run, plot_runs


def test_eleven_runs_get_eleven_different_styles() -> None:
    colours = [f"C{i}" for i in range(10)]
    styles = line_styles(11, colours)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 11
    assert styles[0] == {"color": "C0", "linestyle": "-"} and styles[10] == {"color": "C0", "linestyle": "--"}
    assert len({(s["color"], s["linestyle"]) for s in line_styles(30, colours)}) == 30


def test_plot_of_eleven_runs_is_written(tmp_path: Path) -> None:
    runs = []
    for index in range(11):
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        rows = [{"round": r, "accuracy": 0.1 * r + 0.01 * index, "loss": 1.0 / (r + index)} for r in range(1, 4)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        runs.append(load_run(folder))
    out = tmp_path / "plot.png"
    plot_runs(runs, out, title="eleven")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
