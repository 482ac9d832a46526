"""Results pulled as they arrive, folded in a fixed order: the admission rule that makes both possible.

Floating-point addition is not associative, so a run repeats bit for bit only if every round folds its updates
in the same order (the configured worker order). Waiting for each worker in turn would let the first slow
worker hold everyone else past their deadlines, so transfers are admitted as results arrive and folded in order
once in. :class:`OrderedFold` bounds what that costs: at most ``capacity`` updates are being received or waiting
for their turn at once, and one of those places is always kept for the *frontier*, the next worker in fold
order, so the fold can never deadlock on early arrivals. With ``capacity`` 1 only the frontier transfers (the
least memory: the global model, the accumulator and one update); each extra place buys one more concurrent
transfer for one more update's worth of memory.

A worker that fails or is dropped is released like one that folded, so the frontier moves past it at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

__all__ = ["OrderedFold"]


class OrderedFold:
    """The admission rule, with a wake-up aimed at each waiter.

    Every waiter has its own future, resolved only when it may go on: a release wakes the new frontier and as
    many early arrivals as there are free places, not every worker of the round. (A condition variable woken for
    all would make each of n releases wake up to n waiters: a thousand-worker round spent seconds of coordinator
    CPU on wake-ups alone.) Early arrivals are admitted in the order they asked.
    """

    def __init__(self, order: Sequence[str], *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if len(set(order)) != len(order):
            raise ValueError("fold order names a worker twice")
        self._order = list(order)
        self._capacity = capacity
        self._position = 0
        self._finished: set[str] = set()
        self._holders: set[str] = set()
        self._admitting: dict[str, asyncio.Future[None]] = {}  # waiting for a place, in the order they asked
        self._turns: dict[str, asyncio.Future[None]] = {}  # admitted, waiting to be the frontier

    @property
    def frontier(self) -> str | None:
        """The worker whose update folds next, or None when every worker is done."""
        return self._order[self._position] if self._position < len(self._order) else None

    @property
    def holders(self) -> frozenset[str]:
        """Workers admitted to transfer (or holding a received update) that have not finished yet."""
        return frozenset(self._holders)

    def _may_admit(self, worker: str) -> bool:
        frontier = self.frontier
        if worker == frontier:
            return True
        others = len(self._holders) - (frontier in self._holders)
        return others < self._capacity - 1

    async def admit(self, worker: str) -> float:
        """Wait for a place to receive ``worker``'s update; returns the seconds waited (not the worker's fault)."""
        self._check(worker)
        started = time.monotonic()
        if worker == self.frontier or (not self._admitting and self._may_admit(worker)):
            self._holders.add(worker)
            return 0.0
        place = self._admitting[worker] = asyncio.get_running_loop().create_future()
        try:
            await place
        except asyncio.CancelledError:
            self._admitting.pop(worker, None)
            if place.done() and not place.cancelled():  # granted, but its task was cancelled before it resumed
                self._holders.discard(worker)
                self._wake()
            raise
        return time.monotonic() - started

    async def turn(self, worker: str) -> None:
        """Wait until every worker before ``worker`` in fold order has folded or been released."""
        self._check(worker)
        if self.frontier == worker:
            return
        turn = self._turns[worker] = asyncio.get_running_loop().create_future()
        try:
            await turn
        finally:
            self._turns.pop(worker, None)

    def release(self, worker: str) -> None:
        """``worker`` folded, failed or was dropped: free its place and move the frontier past finished workers."""
        if worker in self._finished:
            return
        self._finished.add(worker)
        self._holders.discard(worker)
        while self._position < len(self._order) and self._order[self._position] in self._finished:
            self._position += 1
        self._wake()

    def _wake(self) -> None:
        """Resolve the waiters that may go on now: the frontier's turn or place, then early arrivals in order."""
        frontier = self.frontier
        if frontier is not None:
            turn = self._turns.get(frontier)
            if turn is not None and not turn.done():
                turn.set_result(None)
            place = self._admitting.get(frontier)
            if place is not None:
                self._grant(frontier, place)
        for worker in list(self._admitting):
            if not self._may_admit(worker):
                break
            self._grant(worker, self._admitting[worker])

    def _grant(self, worker: str, place: asyncio.Future[None]) -> None:
        del self._admitting[worker]
        if not place.done():
            self._holders.add(worker)
            place.set_result(None)

    def _check(self, worker: str) -> None:
        if worker not in self._order:
            raise KeyError(f"worker {worker!r} is not part of this fold")
        if worker in self._finished:
            raise RuntimeError(f"worker {worker!r} already finished this fold")
