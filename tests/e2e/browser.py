"""A headless Chromium driven over the DevTools protocol (the ``websockets`` package, no Playwright): open a
page, collect its console errors and uncaught exceptions, read values from the DOM, take a screenshot.

Chromium is started with ``--remote-debugging-port=0`` and announces its endpoint on stderr; we read that line
(no port guessing, no polling) and talk to the browser over that one WebSocket.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["chromium_path", "PageResult", "load_page"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)  # console errors, failed loads, uncaught exceptions
    values: dict[str, Any] = field(default_factory=dict)  # expression -> value, evaluated after load
    screenshot: bytes = b""


class _Devtools:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message and message["id"] in self.pending:
                self.pending.pop(message["id"]).set_result(message)
            else:
                await self.events.put(message)

    async def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        number = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[number] = future
        payload: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            payload["sessionId"] = session
        await self.ws.send(json.dumps(payload))
        answer = await future
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result


def _collect(event: dict[str, Any], errors: list[str]) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        errors.append(f"exception: {details.get('text')} {details.get('exception', {}).get('description', '')}")
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")


async def _drive(endpoint: str, url: str, expressions: list[str], width: int, timeout: float) -> PageResult:
    result = PageResult()
    async with connect(endpoint, max_size=256 * 2**20, open_timeout=timeout) as ws:
        tools = _Devtools(ws)
        try:
            target = await tools.call("Target.createTarget", {"url": "about:blank"})
            attached = await tools.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                await tools.call(f"{domain}.enable", session=session)
            await tools.call("Emulation.setDeviceMetricsOverride",
                             {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            await tools.call("Page.navigate", {"url": url}, session=session)
            async with asyncio.timeout(timeout):
                while True:
                    event = await tools.events.get()
                    _collect(event, result.errors)
                    if event.get("method") == "Page.loadEventFired":
                        break
            for expression in expressions:
                answer = await tools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                          session=session)
                result.values[expression] = answer.get("result", {}).get("value")
            metrics = await tools.call("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = await tools.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(float(size["height"]), 8000.0), "scale": 1},
            }, session=session)
            result.screenshot = base64.b64decode(shot["data"])
            while not tools.events.empty():  # anything reported while we evaluated and drew
                _collect(tools.events.get_nowait(), result.errors)
        finally:
            tools.reader.cancel()
    return result


def load_page(page: Path, *, expressions: Sequence[str] = (), width: int = 1200, timeout: float = 60.0) -> PageResult:
    """Open ``page`` in a fresh headless Chromium profile; the browser is always stopped afterwards."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("no chromium on PATH (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="fedlink-chromium-") as profile:
        process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        drain: threading.Thread | None = None
        try:
            assert process.stderr is not None
            endpoint = None
            for raw in process.stderr:  # Chromium prints the endpoint once it listens; nothing to poll
                line = raw.decode(errors="replace").strip()
                if line.startswith("DevTools listening on "):
                    endpoint = line.removeprefix("DevTools listening on ")
                    break
            if endpoint is None:
                raise RuntimeError(f"chromium exited ({process.wait()}) without a DevTools endpoint")
            stderr = process.stderr
            drain = threading.Thread(target=stderr.read, daemon=True)  # keep its pipe from filling up
            drain.start()
            return asyncio.run(_drive(endpoint, page.resolve().as_uri(), list(expressions), width, timeout))
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            if drain is not None:
                drain.join(15)
            if process.stderr is not None:
                process.stderr.close()
