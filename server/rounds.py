"""One federated round over connected workers: dispatch, collect in a fixed order, check, aggregate.

Training requests go out to every selected worker at once; results are then taken in the workers' configured
order, one transfer at a time, each checked and folded into the strategy's aggregation as soon as it is in. The
fixed order makes the floating-point sum, and so the run, repeat bit for bit; one transfer at a time bounds the
coordinator's memory to the global model, the accumulator and one update, whatever the number of workers. The
coordinator's own link is the bottleneck of a star anyway, so little time is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.messages import ModelSpec, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.session import Inbound
from fedlink.protocol.tensors import State, StateHeader

from .aggregate import non_finite
from .errors import InvalidUpdate, NotEnoughWorkers
from .remote import RemoteWorker
from .strategy import ClientUpdate, Strategy

__all__ = ["RoundObserver", "WorkerOutcome", "RoundReport", "run_round", "derive_seed", "check_result"]

log = logging.getLogger("fedlink.server")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run's seed and a path (round, worker...), so every random choice is reproducible."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class RoundObserver(Protocol):
    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None: ...


@dataclass
class WorkerOutcome:
    worker: str
    status: str  # "ok" or "dropped"
    reason: str = ""
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0


@dataclass
class RoundReport:
    server_round: int
    state: State
    outcomes: list[WorkerOutcome]
    seconds: float
    wall_seconds: float = 0.0  # set by the coordinator: from the previous round's model to this one's

    @property
    def contributed(self) -> list[WorkerOutcome]:
        return [o for o in self.outcomes if o.status == "ok"]


def check_result(result: TrainResult, *, request: TrainRequest, max_samples: int) -> None:
    """Refuse a result that does not answer this request or claims an absurd sample count."""
    if result.round != request.round or result.task_id != request.task_id:
        raise InvalidUpdate(f"answer for round {result.round} task {result.task_id!r}, expected {request.task_id!r}")
    if result.update != request.plan.update:
        raise InvalidUpdate(f"sent {result.update!r} where {request.plan.update!r} was asked for")
    if result.num_samples <= 0:
        raise InvalidUpdate("reports zero samples")
    if result.num_samples > max_samples:
        raise InvalidUpdate(f"reports {result.num_samples} samples but its shard holds {max_samples}")


async def run_round(
    server_round: int,
    workers: Sequence[RemoteWorker],
    *,
    global_state: State,
    header: StateHeader,
    update_header: StateHeader,
    model: ModelSpec,
    plan: TrainingPlan,
    strategy: Strategy,
    seed: int,
    deadline: float,
    min_workers: int,
    observer: RoundObserver | None = None,
) -> RoundReport:
    """Train ``workers`` for one round and return the aggregated state; raises NotEnoughWorkers below the floor.

    ``deadline`` is an event-loop time: whatever has not arrived by then is dropped, and late answers are
    discarded by the session (results carry their round and task id).
    """
    started = time.perf_counter()
    plan = strategy.configure_train(server_round, plan)

    def note(worker: str, status: str, detail: str = "") -> None:
        if observer is not None:
            observer.worker_status(server_round, worker, status, detail)

    requests: dict[str, TrainRequest] = {}
    tasks: dict[str, asyncio.Task[Inbound]] = {}
    for worker in workers:
        assert worker.session is not None
        request = TrainRequest(
            round=server_round,
            task_id=f"r{server_round}-{worker.name}",
            model=model,
            plan=plan.model_copy(update={"seed": derive_seed(seed, server_round, worker.name)}),
        )
        requests[worker.name] = request
        tasks[worker.name] = asyncio.ensure_future(
            worker.session.request(request, state=global_state, header=header, timeout=None)
        )
        note(worker.name, "training")

    log.info("round %d: training on %d workers (%s)", server_round, len(workers), ", ".join(requests))
    aggregation = strategy.begin_round(server_round, global_state)
    outcomes: list[WorkerOutcome] = []
    try:
        for worker in workers:
            outcome = WorkerOutcome(worker=worker.name, status="dropped")
            outcomes.append(outcome)
            try:
                async with asyncio.timeout_at(deadline):
                    inbound = await tasks[worker.name]
                    result = inbound.message
                    assert isinstance(result, TrainResult)
                    outcome.train_seconds = result.train_seconds
                    check_result(result, request=requests[worker.name], max_samples=worker.num_samples)
                    note(worker.name, "uploading")
                    state = await inbound.fetch(expected=update_header)
                bad = non_finite(state)
                if bad:
                    raise InvalidUpdate(f"NaN or infinite values in {', '.join(bad[:5])}")
                aggregation.add(
                    ClientUpdate(
                        worker=worker.name,
                        kind=result.update,
                        num_samples=result.num_samples,
                        state=state,
                        metrics=result.metrics,
                    )
                )
                del state
                outcome.status = "ok"
                outcome.num_samples = result.num_samples
                outcome.metrics = dict(result.metrics)
                note(worker.name, "done", f"loss {result.metrics.get('loss', float('nan')):.4f}")
            except TimeoutError:
                outcome.reason = "missed the round deadline (timeouts.round)"
            except (ProtocolError, InvalidUpdate) as exc:
                outcome.reason = str(exc)
            if outcome.status != "ok":
                log.warning("round %d: dropped worker %r: %s", server_round, worker.name, outcome.reason)
                note(worker.name, "dropped", outcome.reason)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    contributed = sum(1 for o in outcomes if o.status == "ok")
    if contributed < min_workers:
        reasons = "; ".join(f"{o.worker}: {o.reason}" for o in outcomes if o.status != "ok")
        raise NotEnoughWorkers(
            f"round {server_round}: only {contributed} of {len(workers)} workers answered, "
            f"sampling.min_workers is {min_workers} ({reasons})"
        )
    new_state = aggregation.finish()
    return RoundReport(server_round, new_state, outcomes, time.perf_counter() - started)
