"""Terminal and log injection (issue 9, defect 1), with real processes: a worker id is restricted to a safe
character set at the CLI and at the handshake, and nothing a stranger sends can stop ``fl-coordinator train``
(drawing its live table on a terminal) or forge lines in its output; the job then completes."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fedlink.protocol.auth import new_token
from fedlink.protocol.messages import ErrorMessage
from fedlink.server.localworkers import start_worker, worker_command

from .hostile import CoordinatorProcess, exchange, job_config, raw_control

pytestmark = pytest.mark.timeout(240)

#: What an attacker puts in an id or a message: rich markup that does not parse, a terminal title change (OSC 0),
#: a hyperlink (OSC 8), a screen clear, and a newline with a log line of its own.
PAYLOAD = "lab[/x] \x1b]0;pwned\x07 \x1b]8;;http://evil\x07link\x1b]8;;\x07 \x1b[2J\r\nFORGED ERROR fedlink.server: all lost"


def test_fl_worker_refuses_an_unsafe_id_before_anything_starts(digit_shards: tuple[list[Path], Path]) -> None:
    for bad in ("lab[/x]", "a b", "-lead", "x" * 129, "tab\tid"):
        done = subprocess.run(
            [*worker_command(), "--data", str(digit_shards[0][0]), "--port", "0", "--id", bad],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2 and done.stdout == "", bad
        assert "is not a valid worker id" in done.stderr and "ASCII letters, digits" in done.stderr, done.stderr


def test_the_default_id_is_the_shard_name_made_safe(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shard = tmp_path / "lab [x] site\x1b.npy"
    shutil.copy(digit_shards[0][0], shard)
    worker = start_worker(shard, extra_args=["--threads", "1"], log_path=tmp_path / "w.log")
    try:
        answers, _ = asyncio.run(exchange(worker.url, [raw_control({"v": 1, "type": "hello", "role": "coordinator",
                                                                     "peer_id": "probe"})], read=1))
    finally:
        assert worker.stop() == 0
    assert answers[0].peer_id == "lab-x-site"


def test_hostile_hellos_and_errors_cannot_stop_the_coordinator_or_forge_its_output(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    token = tmp_path / "site-1.token"
    token.write_text(new_token())
    token.chmod(0o600)
    config = job_config(tmp_path, listen={"host": "127.0.0.1", "port": 0}, auth={"workers": {"site-1": str(token)}})
    coordinator = CoordinatorProcess(config, terminal=True)  # the live table, as an operator sees it
    worker = None
    try:
        url = coordinator.wait_for(r"listening for workers on (ws://[0-9.:]+)").group(1)
        bad_id, unknown, known = asyncio.run(_attack(url))
        assert bad_id == ["hello", "error:malformed"], bad_id
        assert unknown == known == ["hello", "auth_challenge"], "refused after the challenge, known id or not"
        worker = start_worker(
            digit_shards[0][0], worker_id="site-1", log_path=tmp_path / "site-1.log",
            extra_args=["--threads", "1", "--connect", url, "--token-file", str(token)],
        )
        code = coordinator.finish()
    finally:
        if worker is not None:
            worker.stop()
        coordinator.finish(30)
    output = coordinator.output
    assert code == 0, output[-3000:]
    assert "fedlink · hardening" in output, "the live table was drawn"
    assert "MarkupError" not in output and "Traceback" not in output
    assert "\x1b]0;pwned" not in output and "\x1b]8;;http://evil" not in output and "\x1b[2J" not in output
    assert not any(line.lstrip().startswith("FORGED") for line in output.replace("\r", "\n").splitlines())
    assert "FORGED" in output, "the attacker's words are shown, escaped, on the line that reports them"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in records if "workers" in r][-2:] == [1, 1], "the job completed"


async def _attack(url: str) -> list[list[str]]:
    """Three strangers: an id holding the payload; an unknown id, then a known one, answering the challenge with
    an error that carries it. Returns what each was sent before the coordinator hung up."""
    hello = {"v": 1, "type": "hello", "role": "worker", "auth": "hmac-sha256"}
    scripts = [
        [raw_control({**hello, "peer_id": PAYLOAD})],
        [raw_control({**hello, "peer_id": "site-2"}), raw_control({"v": 1, "type": "error", "code": "x\x1b[31m", "message": PAYLOAD})],
        [raw_control({**hello, "peer_id": "site-1"}), raw_control({"v": 1, "type": "error", "code": "auth_failed", "message": PAYLOAD})],
    ]
    seen = []
    for script in scripts:
        answers, _ = await exchange(url, script)
        seen.append([f"error:{a.code}" if isinstance(a, ErrorMessage) else getattr(a, "type", "data") for a in answers])
    return seen
