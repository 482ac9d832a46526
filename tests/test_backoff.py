"""The one reconnect loop: backoff after failures, and a coordinator's at-once redial after a lost connection."""

from __future__ import annotations

import asyncio

from fedlink.backoff import Backoff, keep_connected


async def test_a_lost_connection_is_redialled_at_once_when_asked() -> None:
    stop = asyncio.Event()
    calls = 0

    async def serve_once() -> bool:  # connects, then loses the connection; the third time the run ends
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()
        return True

    # A pause would be 50 s or more: the wait_for below fails unless no pause is taken between connections.
    await asyncio.wait_for(keep_connected(serve_once, stop=stop, backoff=Backoff(base=100, cap=100), redial_at_once=True), 5)
    assert calls == 3


async def test_failures_back_off_and_a_connection_resets_the_backoff() -> None:
    stop = asyncio.Event()
    outcomes = [False, False, True, False]
    pauses: list[int] = []
    backoff = Backoff(base=0.001, cap=0.002)

    async def serve_once() -> bool:
        ok = outcomes.pop(0)
        if not outcomes:
            stop.set()
        return ok

    await asyncio.wait_for(
        keep_connected(serve_once, stop=stop, backoff=backoff, on_retry=lambda delay: pauses.append(backoff.attempt)), 5
    )
    assert pauses == [1, 2, 1], "each pause follows a failure or a served connection; a connection resets the count"
