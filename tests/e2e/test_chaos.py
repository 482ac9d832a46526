"""The short chaos run CI can afford: workers killed and restarted, one link cut per round, every round done.

The full run (20 MNIST rounds over 5 workers) is ``python bench/chaos.py``; see bench/README.md.
"""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_short_chaos_run_finishes_every_round_close_to_a_clean_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--dataset", "digits", "--rounds", "8", "--workers", "4",
         "--kill-every", "2", "--tolerance", "3"],
        capture_output=True,
        timeout=600,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-3000:]
    assert "PASS" in out
    kills = next(line for line in out.splitlines() if line.startswith("kills:"))
    assert not kills.startswith("kills: 0"), "the chaos run killed at least one worker"
    cuts = next(line for line in out.splitlines() if line.startswith("connection cuts"))
    assert cuts.endswith("cuts made: 8") or int(cuts.rsplit(":", 1)[1]) >= 4, cuts
