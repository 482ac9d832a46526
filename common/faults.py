"""Fault injection for tests and chaos runs, on loopback only: a TCP proxy that delays, throttles and cuts.

:class:`FaultProxy` sits between a coordinator and a worker (point the coordinator at :attr:`FaultProxy.url`).
It runs its own event loop in a thread, so synchronous tests, subprocess coordinators and in-process ones can all
use it. It refuses to forward anywhere but a loopback address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FaultProxy", "ProxyStats", "corrupt"]

log = logging.getLogger("fedlink.faults")

_CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``; faults can be changed while it runs.

    ``latency``: seconds added to every chunk in each direction; ``bandwidth``: bytes per second per direction;
    ``upload_bandwidth``: bytes per second from the worker back to the coordinator only (a worker that drips its
    answers while it receives at full speed);
    :meth:`cut_after` arms a one-shot cut of the connection once that many more bytes have passed, which lands
    in the middle of a model transfer when the count is smaller than the model.
    """

    def __init__(
        self, target_host: str, target_port: int, *, latency: float = 0.0, bandwidth: float | None = None,
        upload_bandwidth: float | None = None,
    ) -> None:
        if not ipaddress.ip_address(socket.gethostbyname(target_host)).is_loopback:
            raise ValueError(f"FaultProxy forwards to loopback addresses only, not {target_host}")
        self.target = (target_host, target_port)
        self.latency = latency
        self.bandwidth = bandwidth
        self.upload_bandwidth = upload_bandwidth
        self.stats = ProxyStats()
        self._cut_budget: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_done = threading.Event()
        self.port = 0

    @classmethod
    def for_url(cls, url: str, **faults: float | None) -> "FaultProxy":
        host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        return cls(host.strip("[]"), int(port), **faults)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut_after(self, nbytes: int) -> None:
        """Cut the connection carrying the next ``nbytes`` bytes (counted over all connections), once."""
        self.cut_done.clear()
        self._cut_budget = nbytes

    def cut_all(self) -> None:
        """Drop every open connection at once (a reset, no close handshake)."""
        def drop() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self.stats.cuts += 1
        self._loop.call_soon_threadsafe(drop)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._writers.update(pair)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, pair, "up"), self._pump(up_reader, writer, pair, "down"),
                return_exceptions=True,
            )
        finally:
            for w in pair:
                w.transport.abort()
                self._writers.discard(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: tuple[asyncio.StreamWriter, ...], direction: str) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                writer.transport.abort()
                return
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.bandwidth:
                await asyncio.sleep(len(data) / self.bandwidth)
            if self.upload_bandwidth and direction == "down":
                # In small slices: a drip, not one long pause followed by a burst.
                for start in range(0, len(data), 4096):
                    await asyncio.sleep(len(data[start : start + 4096]) / self.upload_bandwidth)
            if self._cut_budget is not None:
                self._cut_budget -= len(data)
                if self._cut_budget <= 0:
                    self._cut_budget = None
                    self.stats.cuts += 1
                    log.info("cutting a connection mid-stream")
                    for w in pair:
                        w.transport.abort()
                    self.cut_done.set()
                    return
            if direction == "up":
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            writer.write(data)
            await writer.drain()


def corrupt(data: bytes, edits: Iterable[tuple[int, int, str]], *, cut: int | None = None) -> bytes:
    """``data`` with byte edits applied: ``(position, value, "set" | "insert" | "delete")``, positions wrapping
    around the current length, then cut at ``cut`` (wrapping too). Fuzzers use it to damage valid frames."""
    out = bytearray(data)
    for position, value, how in edits:
        at = position % (len(out) + 1)
        if how == "insert" or at == len(out):
            out.insert(at, value)
        elif how == "set":
            out[at] = value
        else:
            del out[at]
    if cut is not None:
        del out[cut % (len(out) + 1) :]
    return bytes(out)
