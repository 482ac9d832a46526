"""OrderedFold: transfers admitted as results arrive, folds in configured order, a place kept for the frontier."""

from __future__ import annotations

import asyncio

import pytest

from fedlink.server.fold import OrderedFold


async def _fold_in_arrival_order(order: list[str], arrivals: list[str], capacity: int) -> tuple[list[str], int]:
    """Workers 'arrive' in ``arrivals`` order; each is admitted, waits its turn, folds. Returns (folded, max held)."""
    fold = OrderedFold(order, capacity=capacity)
    folded: list[str] = []
    most = 0
    gates = {w: asyncio.Event() for w in order}

    async def worker(name: str) -> None:
        nonlocal most
        await gates[name].wait()
        await fold.admit(name)
        most = max(most, len(fold.holders))
        await fold.turn(name)
        folded.append(name)
        fold.release(name)

    tasks = [asyncio.ensure_future(worker(w)) for w in order]
    for name in arrivals:
        gates[name].set()
        await asyncio.sleep(0)  # let it run as far as it can before the next one arrives
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    return folded, most


@pytest.mark.parametrize("capacity", [1, 2, 4])
async def test_folds_in_configured_order_whatever_the_arrival_order(capacity: int) -> None:
    order = ["a", "b", "c", "d", "e"]
    folded, most = await _fold_in_arrival_order(order, ["e", "d", "c", "b", "a"], capacity)
    assert folded == order
    assert most <= capacity


async def test_frontier_is_never_blocked_by_early_arrivals() -> None:
    fold = OrderedFold(["first", "b", "c", "d"], capacity=3)
    for early in ("b", "c"):
        await asyncio.wait_for(fold.admit(early), 1)
    blocked = asyncio.ensure_future(fold.admit("d"))
    await asyncio.sleep(0)
    assert not blocked.done(), "two early arrivals fill the places that are not the frontier's"
    await asyncio.wait_for(fold.admit("first"), 1)  # the frontier always gets its place
    assert fold.holders == {"first", "b", "c"}
    fold.release("first")
    await asyncio.wait_for(fold.turn("b"), 1)
    fold.release("b")
    await asyncio.wait_for(blocked, 1)
    blocked.result()


async def test_a_dropped_worker_releases_the_frontier() -> None:
    fold = OrderedFold(["slow", "fast"], capacity=2)
    await fold.admit("fast")
    waiting = asyncio.ensure_future(fold.turn("fast"))
    await asyncio.sleep(0)
    assert not waiting.done() and fold.frontier == "slow"
    fold.release("slow")  # dropped: missed its deadline
    await asyncio.wait_for(waiting, 1)
    assert fold.frontier == "fast"
    fold.release("fast")
    assert fold.frontier is None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        OrderedFold(["a"], capacity=0)
    with pytest.raises(ValueError, match="twice"):
        OrderedFold(["a", "a"], capacity=1)


async def test_unknown_or_finished_workers_are_refused() -> None:
    fold = OrderedFold(["a"], capacity=1)
    with pytest.raises(KeyError):
        await fold.admit("stranger")
    fold.release("a")
    with pytest.raises(RuntimeError, match="already finished"):
        await fold.admit("a")


async def test_a_release_wakes_only_who_may_go_on() -> None:
    """n workers arriving last-first: the admission rule is checked O(n) times in all, not O(n^2).

    Woken all at once on every release, a thousand waiting workers cost the coordinator seconds of CPU a round.
    """
    checks = 0

    class Counting(OrderedFold):
        def _may_admit(self, worker: str) -> bool:
            nonlocal checks
            checks += 1
            return super()._may_admit(worker)

    n = 500
    order = [f"w{i:03d}" for i in range(n)]
    fold = Counting(order, capacity=4)
    folded: list[str] = []

    async def worker(name: str) -> None:
        await fold.admit(name)
        await fold.turn(name)
        folded.append(name)
        fold.release(name)

    tasks = []
    for name in reversed(order):
        tasks.append(asyncio.ensure_future(worker(name)))
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert folded == order
    assert checks <= 10 * n, checks


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    fold = OrderedFold(["first", "b", "c", "d"], capacity=2)
    await fold.admit("b")  # the one place that is not the frontier's
    waiting = asyncio.ensure_future(fold.admit("c"))
    behind = asyncio.ensure_future(fold.admit("d"))
    await asyncio.sleep(0)
    assert not waiting.done() and not behind.done()
    waiting.cancel()
    await asyncio.sleep(0)
    fold.release("b")
    await asyncio.wait_for(behind, 1)
    assert fold.holders == {"d"}, "c's cancelled wait took no place; d got b's"
