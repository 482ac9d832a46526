"""The coordinator's garbage-collector settings (the effect is measured by bench/swarm.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

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


def test_train_freezes_what_exists_once_the_coordinator_is_built(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: frozen\nrounds: 1\nmodel: {factory: fedlink.models:mlp}\nworkers: [ws://127.0.0.1:9]\n"
        f"output: {tmp_path / 'out'}\ntimeouts: {{wait_for_workers: 0.5, connect: 0.5}}\n"
    )
    code = (
        "import gc, sys, fedlink.server.cli as cli\n"
        "before = gc.get_freeze_count()\n"
        "try:\n"
        f"    cli.main(['train', {str(job)!r}], standalone_mode=False)\n"
        "except BaseException as exc:\n"
        "    print(type(exc).__name__, file=sys.stderr)\n"
        "print(before, gc.get_freeze_count())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, after = map(int, done.stdout.split()[-2:])
    assert before == 0 and after > 10_000, done.stderr[-2000:]  # modules, schemas, the model: all frozen


def test_the_coordinator_commands_raise_the_open_file_limit_to_the_hard_one() -> None:
    code = (
        "import resource, fedlink.server.cli as cli\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "try:\n"
        "    cli.main(['train', '/nonexistent/job.yaml'], standalone_mode=False)\n"
        "except BaseException:\n"
        "    pass\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    soft, hard = map(int, done.stdout.split())
    assert soft == hard, done.stderr[-2000:]  # a thousand worker sockets need more than the usual 1,024
