"""The live table and the log lines show peer-supplied text as text: rich markup is not parsed, terminal escapes
and newlines are escaped (issue 9, defect 1). A real rich console on a forced terminal, no mocks."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from fedlink.server.progress import LiveProgress, LogProgress

HOSTILE = "lab[/x] [link=http://evil]x[/link] \x1b]0;pwned\x07 \x1b[2J\r\nFORGED line"


def test_the_live_table_shows_hostile_names_and_details_as_text() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system="truecolor")
    with LiveProgress(console) as progress:
        progress.run_started("job[/x]", 1, ["w1", HOSTILE])
        progress.worker_status(1, HOSTILE, "dropped", HOSTILE)
        progress.worker_status(1, "w1", "training[/bold]", "")
        progress.round_finished({"round": 1, "workers": 1, "accuracy": 0.5, "loss": 1.0, "seconds": 1.0})
    shown = out.getvalue()
    assert "lab[/x]" in shown and "[link=http://evil]" in shown and "job[/x]" in shown, "markup shown, not parsed"
    assert "\\x1b]0;pwned\\x07" in shown and "\x1b]0;pwned" not in shown and "\x1b[2J" not in shown
    assert "\x1b]8;" not in shown, "no hyperlink was drawn"
    assert not any(line.lstrip().startswith("FORGED") for line in shown.replace("\r", "\n").splitlines())


def test_log_lines_escape_peer_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedlink.server"):
        LogProgress().worker_status(3, "w1", "dropped", HOSTILE)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message and "\r" not in message and "\x1b" not in message and "FORGED" in message


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_thousand_workers_are_summarised_not_drawn_row_by_row() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    clock = _Clock()
    names = [f"worker-{i:04d}" for i in range(1000)]
    with LiveProgress(console, clock=clock) as progress:
        progress.run_started("swarm", 1, names)
        for index, name in enumerate(names):
            clock.now = 100.0 + index / 100  # worker-0000 started training first, worker-0999 last
            progress.worker_status(1, name, "training")
        clock.now = 200.0
        for name in names[5:990]:
            progress.worker_status(1, name, "done")
        for name in names[990:]:
            clock.now += 1.0
            progress.worker_status(1, name, "dropped", f"{name} missed its deadline " + HOSTILE)
    final = out.getvalue()
    final = final[final.rindex("round 1: 1000 workers"):]
    assert "training" in final and "985" in final and "10" in final, "counts per status"
    assert "worker-0000" in final and "110.0 s" in final, "the worker busy the longest, and for how long"
    assert "worker-0004" in final and "worker-0005" not in final, "busy workers: only the five oldest"
    assert "worker-0999" in final and "missed its deadline" in final, "latest failures, with why"
    assert "worker-0100" not in final and final.count("worker-") <= 15, "no row per worker (5 busy, 5 failed naming themselves twice)"
    assert "\x1b]0;pwned" not in final and "[link=http://evil]" in final


def test_few_workers_keep_a_row_each() -> None:
    out = io.StringIO()
    with LiveProgress(Console(file=out, force_terminal=True, width=160, color_system=None)) as progress:
        progress.run_started("small", 1, [f"w{i}" for i in range(24)])
        progress.worker_status(1, "w23", "done")
    final = out.getvalue()
    final = final[final.rindex("round 1"):]
    assert all(f"w{i} " in final for i in range(24))


def test_events_do_not_redraw_the_display() -> None:
    """An event is a dictionary update: with a thousand workers, redrawing on each would cost O(n^2) per round."""

    class Counting(LiveProgress):
        renders = 0

        def _render(self):  # type: ignore[no-untyped-def]
            Counting.renders += 1
            return super()._render()

    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    progress = Counting(console)
    progress.run_started("swarm", 1, [f"w{i}" for i in range(1000)])
    for i in range(1000):
        progress.worker_status(1, f"w{i}", "training")
    assert Counting.renders <= 2, Counting.renders
