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
