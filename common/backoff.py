"""Retry pacing shared by everything that reconnects (coordinator to workers, workers dialling out)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

__all__ = ["Backoff", "keep_connected"]


class Backoff:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``."""

    def __init__(self, *, base: float = 0.25, cap: float = 10.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = random.Random()

    def next_delay(self) -> float:
        delay = self._rng.uniform(self.base / 2, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def keep_connected(
    serve_once: Callable[[], Awaitable[bool]],
    *,
    stop: asyncio.Event,
    backoff: Backoff,
    on_retry: Callable[[float], None] | None = None,
    redial_at_once: bool = False,
) -> None:
    """Connect, serve until the connection ends, and start again with backoff, until ``stop`` is set.

    The one reconnect loop of fedlink: a coordinator keeping a worker connected and a worker dialling out to a
    coordinator both run it. ``serve_once`` returns after its connection ended (or failed to open); it returns
    True when it did connect, which resets the backoff. ``on_retry`` hears each pause before it starts.
    ``redial_at_once``: after a connection that was up, try again without a pause (a coordinator wants a lost
    worker back within the round; a worker dialling out pauses, since the coordinator may have sent it away).
    """
    while not stop.is_set():
        connected = await serve_once()
        if connected:
            backoff.reset()
        if stop.is_set():
            return
        if connected and redial_at_once:
            continue
        delay = backoff.next_delay()
        if on_retry is not None:
            on_retry(delay)
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass
