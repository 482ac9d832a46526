"""The HTML report in a real headless Chromium: it loads without console errors, shows its charts, runs no
injected script, and its screenshot is kept (tmp dir, and $FEDLINK_ARTIFACTS when set: "1" means runs/artifacts).

CI installs Debian's ``chromium`` (.ci/run); elsewhere, without a browser, the test skips (fails under
FEDLINK_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedlink.server.html_report import write_html

from ..server.runfolders import write_run
from .browser import chromium_path, load_page
from .conftest import ROOT

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def browser() -> str:
    path = chromium_path()
    if path is None:
        reason = "no chromium on PATH: apt-get install -y chromium"
        if os.environ.get("FEDLINK_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _keep(screenshot: Path) -> None:
    where = os.environ.get("FEDLINK_ARTIFACTS")
    if where:
        folder = ROOT / "runs" / "artifacts" if where == "1" else Path(where)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, folder / screenshot.name)


def test_report_opens_without_console_errors_and_shows_its_charts(browser: str, tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "fedavg"), write_run(tmp_path / "fedprox", drop_round=5, pace=3.0)]
    page = write_html(runs, tmp_path / "report.html", title="fedavg vs fedprox")
    result = load_page(page, expressions=[
        "document.title",
        "document.querySelectorAll('figure.chart svg').length",
        "document.querySelectorAll('svg polyline').length",
        "document.querySelectorAll('script').length",
        "Math.round(document.querySelector('svg polyline').getBoundingClientRect().width)",
    ])
    assert result.errors == [], result.errors
    assert result.values["document.title"] == "fedavg vs fedprox", "an injected script changed the title"
    assert result.values["document.querySelectorAll('figure.chart svg').length"] >= 7  # 5 curves + 2 worker charts
    assert result.values["document.querySelectorAll('svg polyline').length"] >= 10
    assert result.values["document.querySelectorAll('script').length"] == 0
    assert result.values["Math.round(document.querySelector('svg polyline').getBoundingClientRect().width)"] > 200
    shot = tmp_path / "html-report.png"
    shot.write_bytes(result.screenshot)
    assert result.screenshot.startswith(b"\x89PNG") and len(result.screenshot) > 20_000
    _keep(shot)


def test_console_errors_are_caught(browser: str, tmp_path: Path) -> None:
    """The check above can fail: a page with a throwing script and a missing image reports both."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><img src='missing.png'>"
                    "<script>console.error('boom'); throw new Error('kaput')</script></body></html>", encoding="utf-8")
    errors = load_page(page).errors
    assert any("boom" in e for e in errors) and any("kaput" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors
