"""The short version of ``bench/swarm.py``: many workers dial in to one coordinator, authenticate, and every one of
them trains in every round. (The full run, 1,000 workers, is ``python bench/swarm.py``.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from .conftest import ROOT


def test_forty_workers_in_two_processes_all_take_part_in_every_round() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swarm.py"), "--workers", "40", "--processes", "2", "--rounds", "2",
         "--params", "20000"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 40 and len(summary["rounds"]) == 2
    assert "40 workers in 2 processes" in done.stdout
    # round, workers, wall seconds, coordinator CPU seconds, of which garbage collection
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+$", done.stdout, flags=re.MULTILINE)
    assert rows == [("1", "40"), ("2", "40")], done.stdout
    assert "KiB per connected worker" in done.stdout
