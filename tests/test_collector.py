"""The coordinator's garbage-collector settings (the effect is measured by bench/swarm.py)."""

from __future__ import annotations

import gc
import subprocess
import sys

from fedlink.collector import DAEMON_THRESHOLDS, tune_for_daemon


def test_tuning_sets_the_daemon_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_for_daemon()
        assert gc.get_threshold() == DAEMON_THRESHOLDS
        assert DAEMON_THRESHOLDS[0] > 10 * before[0] or before == DAEMON_THRESHOLDS
    finally:
        gc.set_threshold(*before)


def test_the_coordinator_commands_tune_it_and_importing_fedlink_does_not() -> None:
    code = (
        "import gc, fedlink.server.cli as cli\n"
        "before = gc.get_threshold()\n"
        "try:\n"
        "    cli.main(['train', '/nonexistent/job.yaml'], standalone_mode=False)\n"
        "except BaseException:\n"
        "    pass\n"
        "print(before, gc.get_threshold())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split(")")
    assert out[0].strip() == "(700, 10, 10"
    assert out[1].strip() == f"({', '.join(map(str, DAEMON_THRESHOLDS))}"
