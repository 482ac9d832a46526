"""Asynchronous training (FedBuff): no rounds on the wire, a stream of results and a server update every K.

Every connected worker is kept busy: as soon as it answers, it is sent the latest global model again. Each
answer is checked, pulled (at most ``limits.concurrent_uploads`` at once; one of at least ``limits.spill_bytes``
to disk, as in a synchronous round) and added to the strategy's buffer
with its staleness (server updates since the model it trained from); every ``buffer_size`` results the buffer
becomes the next global model, which is recorded, evaluated and checkpointed like a synchronous round. Each
request's seed derives from the run's seed, the worker and its request count, so runs are seeded; the arrival
order of results depends on timing, so unlike synchronous rounds they do not repeat bit for bit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from fedlink.collector import return_free_memory
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.messages import TrainRequest, TrainResult
from fedlink.protocol.spill import Spill
from fedlink.protocol.tensors import header_of

from .aggregate import AccumulatorOverflow, Scanned
from .engine import WorkerOutcome
from .errors import InvalidUpdate
from .remote import RemoteWorker
from .rounds import RoundReport, round_context
from .strategy.base import ClientUpdate, as_aggregate
from .strategy.fedbuff import BufferedAggregation, FedBuff
from .train_stage import check_result, check_update, derive_seed
from .transfer import DownloadCache, upload_slots

if TYPE_CHECKING:
    from .coordinator import Coordinator

__all__ = ["run_buffered"]

log = logging.getLogger("fedlink.server")


class _Buffer:
    """The open buffer and what it has seen, replaced at each server update."""

    def __init__(self, coordinator: "Coordinator", version: int) -> None:
        strategy = coordinator.strategy
        assert isinstance(strategy, FedBuff)
        self.version = version
        aggregation = strategy.start_round(round_context(coordinator.config.seed, version + 1), coordinator.state)
        assert isinstance(aggregation, BufferedAggregation)
        self.aggregation = aggregation
        self.outcomes: list[WorkerOutcome] = []
        self.started = time.perf_counter()


async def _after(previous: "asyncio.Future[None] | None", step: "Coroutine[Any, Any, None]") -> None:
    if previous is not None:
        await previous
    await step


async def run_buffered(coordinator: "Coordinator", *, resume: bool = False) -> list[dict[str, Any]]:
    config = coordinator.config
    strategy = coordinator.strategy
    assert isinstance(strategy, FedBuff)
    first_round = coordinator._resume() if resume else 1
    if not resume:
        coordinator.output.start()
    header = header_of(coordinator.state)
    strategy.configure_train(first_round, coordinator._plan(first_round))  # refuses a bad config before any work
    uploads = asyncio.Semaphore(
        upload_slots(config.limits, header, spills=True, compression=coordinator.transfer.compression)
    )
    spill = Spill(config.limits.spill_dir, config.limits.spill_bytes)
    done = asyncio.Event()
    buffer = _Buffer(coordinator, first_round - 1)
    pending: asyncio.Future[None] | None = None
    last_update = time.perf_counter()

    def apply() -> None:
        nonlocal buffer, pending, last_update
        full = buffer
        staleness = full.aggregation.staleness
        aggregate = as_aggregate(full.aggregation.finish())
        version = full.version + 1
        coordinator.state = aggregate.state
        # The next buffer opens before anything is awaited: results arriving meanwhile go into it.
        buffer = _Buffer(coordinator, version)
        if version >= config.rounds:
            done.set()
        metrics = {
            **aggregate.metrics,
            "staleness_mean": sum(staleness) / len(staleness),
            "staleness_max": float(max(staleness)),
        }
        now = time.perf_counter()
        report = RoundReport(version, aggregate.state, full.outcomes, now - full.started, metrics=metrics)
        report.wall_seconds, last_update = now - last_update, now
        # Records, evaluations and checkpoints go in server-update order, off the critical path.
        pending = asyncio.ensure_future(_after(pending, coordinator._complete_round(report, strategy.state_dict())))

    async def one_request(worker: RemoteWorker, count: int) -> bool:
        """One request to ``worker``; returns whether its update was taken."""
        base = buffer.version
        transfer = coordinator.transfer.negotiate(
            worker, strategy.configure_train(base + 1, coordinator._plan(base + 1)), header
        )
        request = TrainRequest(
            round=base + 1,
            task_id=f"b{base + 1}-{worker.name}-{count}",
            model=config.model,
            plan=transfer.plan.model_copy(update={"seed": derive_seed(config.seed, "fedbuff", worker.name, count)}),
            run=coordinator.run_id,
            worker=worker.route,
        )
        # Nothing here keeps the model this worker trains from: once the worker has pulled it, a model the buffer
        # has since replaced is freed, rather than one kept per busy worker.
        outcome = WorkerOutcome(worker=worker.name)
        started = time.perf_counter()
        coordinator.progress.worker_status(base + 1, worker.name, "training")
        sent, sent_header = DownloadCache(coordinator.state, header).get(transfer.download)
        assert worker.session is not None
        asked = worker.session.request(request, state=sent, header=sent_header, timeout=None)
        del sent
        try:
            async with asyncio.timeout(config.timeouts.round):
                inbound = await asked
                result = inbound.message
                if not isinstance(result, TrainResult):
                    raise InvalidUpdate(f"answered a train request with {result.type!r}")
                check_result(result, request=request, max_samples=worker.num_samples)
                async with uploads:
                    received, outcome.spilled_bytes = await transfer.receive(inbound, spill)
                outcome.download_bytes, outcome.upload_bytes = sent_header.nbytes, transfer.wire_header.nbytes
            received = await transfer.dense(received)
            # A delta's frozen parameters are known to be zero; no model is read for them.
            update = transfer.complete(received, coordinator.state, result.update)
            del received  # the update holds what it needs; nothing else keeps it past the fold
            if isinstance(update, dict):
                update = Scanned(update)  # the scan's peaks then spare the fold a pass of its own
            await asyncio.to_thread(check_update, update, max_update_norm=config.limits.max_update_norm)
        except TimeoutError:
            outcome.reason = f"no update within timeouts.round ({config.timeouts.round:g}s)"
        except (ProtocolError, InvalidUpdate) as exc:
            outcome.reason = str(exc)
        outcome.seconds = time.perf_counter() - started
        if done.is_set():
            return False
        if outcome.reason:
            log.warning("worker %r: %s", worker.name, outcome.reason)
            coordinator.progress.worker_status(base + 1, worker.name, "dropped", outcome.reason)
            buffer.outcomes.append(outcome)
            return False
        assert isinstance(result, TrainResult)
        staleness = buffer.version - base
        if strategy.max_staleness is not None and staleness > strategy.max_staleness:
            outcome.reason = f"update {staleness} server updates stale, strategy.max_staleness is {strategy.max_staleness}"
            buffer.outcomes.append(outcome)
            return True
        try:
            buffer.aggregation.add(
                ClientUpdate(worker=worker.name, kind=result.update, num_samples=result.num_samples, state=update,
                             metrics=result.metrics, staleness=staleness)
            )
        except AccumulatorOverflow as exc:
            # Nothing of it was added (see WeightedSum): the buffer goes on as if it had never been sent.
            outcome.reason = f"update refused, it would overflow the buffer's sum: {exc}"
            log.warning("worker %r: %s", worker.name, outcome.reason)
            coordinator.progress.worker_status(base + 1, worker.name, "dropped", outcome.reason)
            buffer.outcomes.append(outcome)
            return False
        finally:
            # A BrokenSum (a spilled update unreadable halfway) goes on up and ends the run: the buffer's sum holds
            # part of an update, and no model is made from it.
            del update
            if outcome.spilled_bytes:
                return_free_memory()  # the slices and frames it took (see fedlink.collector)
        outcome.status, outcome.num_samples, outcome.metrics = "ok", result.num_samples, dict(result.metrics)
        outcome.train_seconds = result.train_seconds
        buffer.outcomes.append(outcome)
        coordinator.progress.worker_status(base + 1, worker.name, "done", f"staleness {staleness}")
        if buffer.aggregation.count >= strategy.buffer_size:
            apply()
        return True

    async def keep_busy(worker: RemoteWorker) -> None:
        count = 0
        while not done.is_set():
            if not worker.connected:
                await coordinator.pool.changed()
                continue
            count += 1
            if not await one_request(worker, count) and not done.is_set():
                # A busy or failing worker is asked again after a pause, not in a tight loop.
                try:
                    async with asyncio.timeout(min(5.0, config.timeouts.round)):
                        await done.wait()
                except TimeoutError:
                    pass

    tasks: dict[int, asyncio.Task[None]] = {}
    try:
        await coordinator.open_pool()
        if first_round > config.rounds:
            done.set()
        await coordinator.pool.wait_for(config.sampling.min_workers, timeout=config.timeouts.wait_for_workers)
        while not done.is_set():
            for worker in coordinator.pool.all():
                if id(worker) not in tasks:
                    tasks[id(worker)] = asyncio.ensure_future(keep_busy(worker))
            changed = asyncio.ensure_future(coordinator.pool.changed())
            finished = asyncio.ensure_future(done.wait())
            await asyncio.wait({changed, finished, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            finished.cancel()
            for task in tasks.values():
                # A worker's loop ends only with the run: one that ended otherwise is a fault of ours, and the run
                # stops with it rather than wait forever for results that worker will never send again.
                if task.done() and not done.is_set():
                    task.result()
                    raise RuntimeError("a worker's request loop ended before the run")
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if pending is not None:
            await pending
        coordinator.save_final_model()
    finally:
        for task in tasks.values():
            task.cancel()
        if pending is not None and not pending.done():
            await asyncio.gather(pending, return_exceptions=True)
        await coordinator.pool.close("training finished")
    return coordinator.history
