"""``fl-coordinator demo``: the embedded default a new user runs first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_trains_above_90_percent_and_stops_its_workers(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("fl-coordinator")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedlink.server"]
    done = subprocess.run([*command, "demo", "--out", str(tmp_path / "demo")], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"demo finished: test accuracy" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5 and records[-1]["accuracy"] > 0.9
    # Every worker the demo started has exited: their logs end with the shutdown, and no process holds a shard.
    logs = sorted((tmp_path / "demo" / "data").glob("shard-*.log"))
    assert len(logs) == 3
    for log in logs:
        assert "shutting down" in log.read_text()
    shards = {str(p) for p in (tmp_path / "demo" / "data").glob("shard-*.npy")}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        assert not shards.intersection(arg.decode(errors="replace") for arg in cmdline), f"stray worker {pid}"


def test_demo_live_table_has_one_row_per_worker_named_by_its_id(tmp_path: Path) -> None:
    """Rows appear as workers connect, under their hello ids; never a second row under the URL that was dialled."""
    import re

    from rich.console import Console

    from fedlink.server.demo import run_demo
    from fedlink.server.progress import LiveProgress

    console = Console(record=True, force_terminal=True, width=160, file=open(os.devnull, "w"))  # noqa: SIM115
    run_demo(tmp_path / "demo", rounds=1, progress=LiveProgress(console))
    text = console.export_text()
    final = text[text.rindex("round 1"):]  # the last drawing of the worker table
    rows = re.findall(r"^\W*(worker-\d+|ws://\S+)\s", final, flags=re.MULTILINE)
    assert sorted(rows) == ["worker-0", "worker-1", "worker-2"], final
    assert "ws://" not in final
