"""Helpers for the hardening tests: a real ``fl-coordinator train`` process (optionally on a terminal, so that it
draws its live table), and a raw WebSocket client that sends whatever frames an attacker writes."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import msgpack
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.frames import decode_frame
from fedlink.protocol.limits import Limits

from .conftest import coordinator_command

__all__ = ["CoordinatorProcess", "job_config", "raw_control", "exchange"]

WAIT = 30.0


def job_config(tmp_path: Path, *, name: str = "hardening", **overrides: Any) -> Path:
    """A small digits job (MLP, 2 rounds, one worker) as a YAML file; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "name": name,
        "seed": 5,
        "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}},
        "rounds": 2,
        "sampling": {"min_workers": 1},
        "training": {"epochs": 1, "batch_size": 32},
        "timeouts": {"round": 60, "connect": 5, "wait_for_workers": 60, "heartbeat": 1.0, "reconnect_max": 0.5},
        "output": str(tmp_path / "run"),
        **overrides,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class CoordinatorProcess:
    """``fl-coordinator train CONFIG --log-level info``; with ``terminal``, its stdout and stderr are a pty, so it
    draws the live rich table as it would for a person. Everything it writes is kept in :attr:`output`."""

    def __init__(self, config: Path, *, terminal: bool = False) -> None:
        self._chunks: list[bytes] = []
        self._changed = threading.Condition()
        args = [*coordinator_command(), "train", str(config), "--log-level", "info"]
        env = {**os.environ, "COLUMNS": "160", "LINES": "50"}
        if terminal:
            master, slave = pty.openpty()
            self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
            os.close(slave)
            self._source = master
        else:
            self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            assert self.process.stdout is not None
            self._source = self.process.stdout.fileno()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._source, 65536)
            except OSError:  # the pty's other end closed
                chunk = b""
            with self._changed:
                if chunk:
                    self._chunks.append(chunk)
                self._changed.notify_all()
            if not chunk:
                return

    @property
    def output(self) -> str:
        with self._changed:
            return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first match of ``pattern`` in the output, waiting for more output (not polling) until ``timeout``."""
        compiled = re.compile(pattern)
        with self._changed:
            found = self._changed.wait_for(
                lambda: compiled.search(b"".join(self._chunks).decode(errors="replace")) is not None
                or not self._reader.is_alive(),
                timeout,
            )
        match = compiled.search(self.output)
        assert found and match is not None, f"{pattern!r} never appeared:\n{self.output[-3000:]}"
        return match

    def finish(self, timeout: float = 180.0) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(30)
            self._reader.join(30)
        return code


def raw_control(body: dict[str, Any]) -> bytes:
    """A control frame holding exactly ``body``, whatever fedlink's own models would allow."""
    return b"\x01" + msgpack.packb(body, use_bin_type=True)


async def exchange(url: str, frames: list[bytes], *, ssl: Any = None, read: int = 8) -> tuple[list[Any], int | None]:
    """Send ``frames`` on a fresh WebSocket, then read up to ``read`` answers until the peer hangs up. Returns the
    answers (decoded messages, or the raw bytes of what does not decode) and the close code received."""
    answers: list[Any] = []
    code: int | None = None
    async with connect(url, subprotocols=["fedlink.v1"], ssl=ssl, open_timeout=WAIT, max_size=1 << 24) as ws:  # type: ignore[list-item]
        try:
            for frame in frames:
                await ws.send(frame)
            for _ in range(read):
                data = await asyncio.wait_for(ws.recv(), WAIT)
                try:
                    answers.append(decode_frame(data, Limits()))
                except ProtocolError:
                    answers.append(data)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
    return answers, code
