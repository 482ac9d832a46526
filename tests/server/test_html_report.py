"""The HTML report as text: self-contained, every peer-supplied string escaped, each section present or said
absent. The page in a real browser is tests/e2e/test_html_report_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from click.testing import CliRunner

from fedlink.server.cli import main as coordinator_cli
from fedlink.server.html_report import line_chart, load_report, nice_ticks, render_html, write_html

from .runfolders import HOSTILE_REASON, HOSTILE_WORKER, write_run


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def test_page_is_self_contained_and_escapes_peer_text(tmp_path: Path) -> None:
    page = render_html([load_report(write_run(tmp_path / "run-a"))])
    parsed = _parse(page)
    tags = [tag for tag, _ in parsed.tags]
    assert "script" not in tags and "img" not in tags, "peer text became markup"
    assert not any(tag in ("link", "iframe", "object", "embed") and attrs.get("href", "data:").startswith(("http", "//"))
                   for tag, attrs in parsed.tags)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must not fetch anything"
    csp = [a for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0]["content"] or "")
    text = "".join(parsed.text)
    assert HOSTILE_WORKER in text and HOSTILE_REASON in text, "the hostile strings are shown, as text"


def test_sections_curves_workers_config_and_privacy(tmp_path: Path) -> None:
    page = render_html([load_report(write_run(tmp_path / "run-a")), load_report(write_run(tmp_path / "run-b"))])
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    for caption in ("Held-out accuracy", "Held-out loss", "Round time", "Privacy budget spent"):
        assert caption in captions
    assert page.count("<polyline") >= 2 * 5, "one curve per run in each line chart"
    assert page.count('class="drop"') == 2, "one dropped bar per run (round 3)"
    assert "workers.jsonl" in page and page.count("<pre>") == 2, "each run's config is shown"
    row = re.search(r"<tr><td class=\"text\">site-a</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>", page)
    assert row and row.groups() == ("8", "0", "1600"), "site-a: 8 rounds contributed, none dropped, 8 x 200 samples"


def test_without_workers_file_or_epsilon(tmp_path: Path) -> None:
    page = render_html([load_report(write_run(tmp_path / "old", epsilon=False, workers_file=False))])
    assert "Privacy budget" not in page
    assert "no workers.jsonl in this run" in page
    assert HOSTILE_WORKER not in page and "&lt;script&gt;" in page  # the drop, from metrics.jsonl, still escaped


def test_chart_scales() -> None:
    ticks = nice_ticks(0.013, 0.987)
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert ticks[0] <= 0.013 and ticks[-1] >= 0.987 and 3 <= len(ticks) <= 8 and steps == {0.2}, ticks
    assert nice_ticks(3.0, 3.0)[0] <= 3.0 <= nice_ticks(3.0, 3.0)[-1]
    svg = line_chart("loss", [("a", [1.0, 2.0, 3.0], [2.0, 0.2, 0.02])], ylabel="loss", log=True)
    assert "(log)" in svg and svg.count("<circle") == 3
    assert "no data" in line_chart("empty", [("a", [], [])])


def test_cli_writes_html_and_needs_an_output(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run-a")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(coordinator_cli, ["report", str(run), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    refused = CliRunner().invoke(coordinator_cli, ["report", str(run)])
    assert refused.exit_code == 2 and "--html" in refused.output
    assert write_html([run], tmp_path / "sub" / "again.html").exists()
