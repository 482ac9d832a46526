"""``fl-coordinator report RUN... --html report.html``: one self-contained HTML page per comparison of runs.

Accuracy, loss and round-time curves, the privacy budget where records carry ``epsilon``, per-worker
contributions and drops (from ``workers.jsonl`` when the run has one, else from each round's ``dropped``), and
each run's config. Charts are inline SVG drawn here: no script, no network, no external file, so the page opens
anywhere (a Content-Security-Policy forbids any fetch). Every string that came from a peer or a file (worker ids,
drop reasons, run names, the config) is escaped.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import Run, load_run
from .runlog import load_config_json, load_worker_records

__all__ = ["RunReport", "load_report", "render_html", "write_html", "line_chart", "nice_ticks"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
_W, _H = 520, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 14, 30, 40


@dataclass
class RunReport:
    run: Run
    workers: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None


def load_report(folder: Path) -> RunReport:
    return RunReport(load_run(folder), load_worker_records(folder), load_config_json(folder))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high] (1, 2, 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude < 0.001:
        return f"{value:.1e}"
    return f"{value:.4g}"


def line_chart(
    title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, ylabel: str = "",
    xlabel: str = "round", log: bool = False,
) -> str:
    """An SVG line chart of ``series`` (name, xs, ys); ``log`` draws y on a log scale (positive values only)."""
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log)]
    head = f'<figure class="chart"><figcaption>{_e(title)}</figcaption>'
    if not points:
        return head + '<p class="empty">no data</p></figure>'
    tf = (lambda v: math.log10(v)) if log else (lambda v: v)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(tf(p[1]) for p in points), max(tf(p[1]) for p in points)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if log:
        y_lo, y_hi = math.floor(y_lo), math.ceil(y_hi) if math.ceil(y_hi) > math.floor(y_lo) else math.floor(y_lo) + 1
        yticks = [float(v) for v in range(int(y_lo), int(y_hi) + 1)]
    else:
        yticks = nice_ticks(y_lo, y_hi)
        y_lo, y_hi = yticks[0], yticks[-1]
        if y_hi == y_lo:
            y_hi = y_lo + 1
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return _TOP + plot_h - (tf(y) - y_lo) / (y_hi - y_lo) * plot_h

    parts = [head, f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_e(title)}">']
    for tick in yticks:
        y = _TOP + plot_h - (tick - y_lo) / (y_hi - y_lo) * plot_h
        label = _fmt(10**tick) if log else _fmt(tick)
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    xticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi and float(t).is_integer()]
    for tick in xticks:
        x = sx(tick)
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h + 4}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{_TOP + plot_h + 17}" text-anchor="middle">{int(tick)}</text>')
    parts.append(f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}"/>')
    parts.append(f'<text class="label" x="{_LEFT + plot_w / 2:.1f}" y="{_H - 6}" text-anchor="middle">{_e(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text class="label" transform="translate(14 {_TOP + plot_h / 2:.1f}) rotate(-90)" '
                     f'text-anchor="middle">{_e(ylabel)}{" (log)" if log else ""}</text>')
    # The legend goes in the top corner the curves leave free: top right when they fall, top left when they rise.
    ordered = sorted(points)
    third = max(len(ordered) // 3, 1)
    falling = sum(tf(y) for _, y in ordered[:third]) / third > sum(tf(y) for _, y in ordered[-third:]) / third
    legend_x = _W - _RIGHT - 150 if falling else _LEFT + 8
    for i, (name, xs, ys) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        kept = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log)]
        if not kept:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in kept)
        parts.append(f'<polyline class="series" points="{path}" stroke="{color}"/>')
        for x, y in kept:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                         f'<title>{_e(name)}: round {x:g}, {_e(_fmt(y))}</title></circle>')
        parts.append(f'<rect x="{legend_x}" y="{_TOP + 8 + 15 * i}" width="10" height="10" fill="{color}"/>'
                     f'<text class="legend" x="{legend_x + 14}" y="{_TOP + 17 + 15 * i}">{_e(name)}</text>')
    parts.append("</svg></figure>")
    return "".join(parts)


def _bar_chart(title: str, rounds: Sequence[int], ok: Sequence[int], dropped: Sequence[int]) -> str:
    """Stacked bars per round: workers that contributed (green) and that were dropped (red)."""
    head = f'<figure class="chart"><figcaption>{_e(title)}</figcaption>'
    if not rounds:
        return head + '<p class="empty">no data</p></figure>'
    top = max(max(a + b for a, b in zip(ok, dropped)), 1)
    yticks = [t for t in nice_ticks(0, top) if float(t).is_integer()] or [0.0, float(top)]
    y_hi = max(yticks[-1], top)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / len(rounds)
    bar = max(min(slot * 0.7, 28), 1.0)
    parts = [head, f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_e(title)}">']
    for tick in yticks:
        y = _TOP + plot_h - tick / y_hi * plot_h
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{int(tick)}</text>')
    every = max(1, len(rounds) // 12)
    for i, (r, a, b) in enumerate(zip(rounds, ok, dropped)):
        x = _LEFT + slot * i + (slot - bar) / 2
        h_ok, h_drop = a / y_hi * plot_h, b / y_hi * plot_h
        base = _TOP + plot_h
        parts.append(f'<rect class="ok" x="{x:.1f}" y="{base - h_ok:.1f}" width="{bar:.1f}" height="{h_ok:.1f}">'
                     f'<title>round {r}: {a} contributed</title></rect>')
        if b:
            parts.append(f'<rect class="drop" x="{x:.1f}" y="{base - h_ok - h_drop:.1f}" width="{bar:.1f}" '
                         f'height="{h_drop:.1f}"><title>round {r}: {b} dropped</title></rect>')
        if i % every == 0:
            parts.append(f'<text class="tick" x="{x + bar / 2:.1f}" y="{base + 17}" text-anchor="middle">{r}</text>')
    parts.append(f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}"/>')
    parts.append(f'<text class="label" x="{_LEFT + plot_w / 2:.1f}" y="{_H - 6}" text-anchor="middle">round</text>')
    parts.append("</svg></figure>")
    return "".join(parts)


def _per_worker(report: RunReport) -> tuple[list[tuple[str, int, int, int, str]], list[int], list[int], list[int]]:
    """(worker, rounds contributed, rounds dropped, samples, drop reasons) rows, and per-round ok/drop counts."""
    ok: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    samples: Counter[str] = Counter()
    reasons: defaultdict[str, Counter[str]] = defaultdict(Counter)
    per_round_ok: Counter[int] = Counter()
    per_round_drop: Counter[int] = Counter()
    if report.workers:
        for rec in report.workers:
            worker, status = rec["worker"], str(rec.get("status", ""))
            if rec.get("stage") not in (None, "train"):
                continue  # one row per worker and round: the training stage decides contribution
            if status == "ok":
                ok[worker] += 1
                per_round_ok[rec["round"]] += 1
                value = rec.get("samples")
                samples[worker] += int(value) if isinstance(value, (int, float)) else 0
            else:
                drops[worker] += 1
                per_round_drop[rec["round"]] += 1
                reasons[worker][str(rec.get("reason") or status or "dropped")] += 1
    else:
        for rec in report.run.records:
            given = rec.get("dropped")
            dropped: dict[str, Any] = given if isinstance(given, dict) else {}
            per_round_ok[rec["round"]] = int(rec.get("workers", 0))
            per_round_drop[rec["round"]] = len(dropped)
            for worker, reason in dropped.items():
                drops[str(worker)] += 1
                reasons[str(worker)][str(reason)] += 1
    rows = []
    for worker in sorted(set(ok) | set(drops)):
        text = "; ".join(f"{reason} ({n}x)" if n > 1 else reason for reason, n in reasons[worker].most_common(3))
        rows.append((worker, ok[worker], drops[worker], samples[worker], text))
    rounds = [int(r["round"]) for r in report.run.records]
    return rows, rounds, [per_round_ok[r] for r in rounds], [per_round_drop[r] for r in rounds]


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#666}
.charts{display:flex;flex-wrap:wrap;gap:12px}
figure.chart{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:6px 8px;background:#fcfcfc}
figcaption{font-weight:600;margin-bottom:2px}
svg .grid{stroke:#e6e6e6} svg .axis{stroke:#888} svg .frame{fill:none;stroke:#bbb}
svg .series{fill:none;stroke-width:1.8} svg text{font-size:11px;fill:#444} svg .legend{font-size:12px}
svg .ok{fill:#2ca02c} svg .drop{fill:#d62728}
table{border-collapse:collapse;margin:6px 0} th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.text{text-align:left;max-width:520px;overflow-wrap:anywhere}
pre{background:#f6f6f6;border:1px solid #e3e3e3;padding:8px;max-height:420px;overflow:auto;font-size:12px}
.empty{color:#999;margin:40px 20px}
"""


def render_html(reports: Sequence[RunReport], *, title: str = "") -> str:
    """The whole page as a string."""
    names = [r.run.name for r in reports]
    heading = title or "fedlink report: " + ", ".join(names)

    def series(key: str) -> list[tuple[str, list[float], list[float]]]:
        out = []
        for report in reports:
            xs, ys = report.run.series(key)
            out.append((report.run.name, [float(x) for x in xs], ys))
        return out

    loss = series("loss")
    positive = [y for _, _, ys in loss for y in ys if math.isfinite(y)]
    log_loss = bool(positive) and min(positive) > 0 and max(positive) / min(positive) > 20
    time_key = "round_seconds" if any(r.run.series("round_seconds")[1] for r in reports) else "seconds"
    body = [
        '<div class="charts">',
        line_chart("Held-out accuracy", series("accuracy"), ylabel="accuracy"),
        line_chart("Held-out loss", loss, ylabel="loss", log=log_loss),
        line_chart("Round time", series(time_key), ylabel="seconds"),
        line_chart("Training loss (workers)", series("train_loss"), ylabel="loss"),
    ]
    if any(r.run.series("epsilon")[1] for r in reports):
        body.append(line_chart("Privacy budget spent", series("epsilon"), ylabel="epsilon"))
    body.append("</div>")
    body.append("<h2>Summary</h2><table><tr><th>run</th><th>rounds</th><th>final accuracy</th><th>best accuracy</th>"
                "<th>final loss</th><th>epsilon</th><th>total time (s)</th></tr>")
    for report in reports:
        _, acc = report.run.series("accuracy")
        _, lss = report.run.series("loss")
        _, eps = report.run.series("epsilon")
        _, secs = report.run.series("seconds")
        cells = [
            str(report.run.records[-1]["round"]),
            f"{acc[-1]:.4f}" if acc else "-", f"{max(acc):.4f}" if acc else "-",
            f"{lss[-1]:.4f}" if lss else "-", f"{eps[-1]:.3g}" if eps else "-", f"{sum(secs):.1f}" if secs else "-",
        ]
        body.append(f'<tr><td class="text">{_e(report.run.name)}</td>' + "".join(f"<td>{_e(c)}</td>" for c in cells)
                    + "</tr>")
    body.append("</table>")
    for report in reports:
        rows, rounds, ok, dropped = _per_worker(report)
        source = "workers.jsonl" if report.workers else "metrics.jsonl (no workers.jsonl in this run)"
        body.append(f"<h2>{_e(report.run.name)}</h2>")
        body.append(f'<h3>Workers</h3><p class="muted">from {_e(source)}</p><div class="charts">')
        body.append(_bar_chart("Workers per round: contributed and dropped", rounds, ok, dropped))
        body.append("</div>")
        if rows:
            body.append("<table><tr><th>worker</th><th>rounds contributed</th><th>rounds dropped</th><th>samples</th>"
                        "<th>drop reasons</th></tr>")
            for worker, n_ok, n_drop, n_samples, text in rows:
                samples = str(n_samples) if report.workers else "-"
                body.append(f'<tr><td class="text">{_e(worker)}</td><td>{n_ok if report.workers else "-"}</td>'
                            f'<td>{n_drop}</td><td>{_e(samples)}</td><td class="text">{_e(text)}</td></tr>')
            body.append("</table>")
        else:
            body.append('<p class="muted">no worker was dropped in any round.</p>')
        body.append("<h3>Config</h3>")
        if report.config is not None:
            body.append(f"<pre>{_e(json.dumps(report.config, indent=2))}</pre>")
        else:
            body.append('<p class="muted">no config.json in this run folder.</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{_e(heading)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(heading)}</h1><p class=\"muted\">{len(reports)} run(s); hover a point for its value.</p>"
        + "".join(body) + "</body></html>\n"
    )


def write_html(folders: Sequence[Path], out: Path, *, title: str = "") -> Path:
    """Render the runs in ``folders`` to ``out`` (one self-contained file); returns ``out``."""
    page = render_html([load_report(folder) for folder in folders], title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
