"""Start and stop local ``fl-worker`` processes: for the demo, the tests and the benchmarks.

A worker prints one line, ``fedlink worker listening on URL``, once it accepts connections; we wait for that line
(never poll a port) and keep its logs in a file beside its shard.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CoordinatorError

__all__ = ["LocalWorker", "Spawned", "spawn_worker", "wait_ready", "start_worker", "start_workers", "stop_workers", "worker_command"]

_READY = ("fedlink worker listening on ", "fedlink worker dialling ")


def worker_command() -> list[str]:
    """The ``fl-worker`` console script of this installation, or ``python -m fedlink.worker`` without one."""
    script = Path(sys.executable).with_name("fl-worker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fedlink.worker"]


@dataclass
class LocalWorker:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    args: tuple[str, ...]
    command: tuple[str, ...] = ()
    _terminated: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM), once: a second SIGTERM during its shutdown would kill it outright."""
        if self.process.poll() is None and not self._terminated:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds; returns the exit status."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to say goodbye, as when a machine dies."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def restart(self, *, ready_timeout: float = 60.0) -> "LocalWorker":
        """Start the same worker again on the same port (it must have exited); updates this object in place."""
        if self.process.poll() is None:
            raise CoordinatorError(f"worker {self.pid} is still running; kill or stop it first")
        args = list(self.args)
        if "--connect" not in args and "--port" in args:
            args[args.index("--port") + 1] = self.url.rsplit(":", 1)[-1]
        fresh = wait_ready(_popen(self.command, args, self.log_path), timeout=ready_timeout)
        self.process, self.url, self.args, self._terminated = fresh.process, fresh.url, fresh.args, False
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn_worker(
    data: Path,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    worker_id: str | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> Spawned:
    """Start ``fl-worker`` (or ``command``, taking the same options) on ``data`` without waiting.

    Pair with :func:`wait_ready`. The log is appended to, so a restarted worker keeps one log.
    """
    args = ["--data", str(data), "--port", str(port), "--host", host, *(["--id", worker_id] if worker_id else []), *extra_args]
    log_path = log_path or data.with_suffix(".log")
    return _popen(command if command is not None else worker_command(), args, log_path, env)


@dataclass
class Spawned:
    """A worker process started but not yet known to listen; :func:`wait_ready` turns it into a LocalWorker."""

    process: subprocess.Popen[bytes]
    args: tuple[str, ...]
    command: tuple[str, ...]
    log_path: Path


def _popen(
    command: Sequence[str], args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Spawned:
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches only the coordinator, which stops us
        )
    return Spawned(process=process, args=tuple(args), command=tuple(command), log_path=log_path)


def wait_ready(spawned: Spawned, *, timeout: float = 60.0) -> LocalWorker:
    """Wait for the worker's ``listening on URL`` line; raises CoordinatorError with its log if it never comes."""
    process, log_path = spawned.process, spawned.log_path
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
        if not ready:
            break
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        line += chunk
    text = line.decode(errors="replace").strip()
    prefix = next((p for p in _READY if text.startswith(p)), None)
    if prefix is None:
        if process.poll() is None:
            process.kill()
        process.wait()
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]) if log_path.exists() else ""
        raise CoordinatorError(f"worker {' '.join(spawned.args)} did not start (exit status {process.returncode}):\n{tail}")
    return LocalWorker(process=process, url=text[len(prefix):], log_path=log_path, args=spawned.args, command=spawned.command)


def start_worker(data: Path, *, ready_timeout: float = 60.0, **options: Any) -> LocalWorker:
    """Start ``fl-worker`` on ``data`` and wait until it listens (options as for :func:`spawn_worker`)."""
    return wait_ready(spawn_worker(data, **options), timeout=ready_timeout)


def start_workers(shards: Sequence[Path], *, ready_timeout: float = 60.0, **options: Any) -> list[LocalWorker]:
    """Start one worker per shard, all at once, named ``worker-0``...; on any failure stop those started."""
    spawned = [spawn_worker(shard, worker_id=f"worker-{i}", **options) for i, shard in enumerate(shards)]
    started: list[LocalWorker] = []
    try:
        for one in spawned:
            started.append(wait_ready(one, timeout=ready_timeout))
    except BaseException:
        for one in spawned:
            process = one.process
            if process.poll() is None:
                process.kill()
                process.wait()
        raise
    return started


def stop_workers(workers: Iterable[LocalWorker]) -> None:
    workers = list(workers)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()
