"""The round engine: a round is a sequence of stages, each sent to every surviving worker on its own clock.

A :class:`Stage` builds one typed request per worker and turns each answer into a result (fetching and checking
any state that comes with it). :func:`run_stage` sends the requests together and takes each answer as it comes:
every worker has its own deadline, measured from when its request went out, so a slow or hostile worker is
dropped alone and never holds an honest one past its time. A stage returns the results in the configured worker
order *and* the failures (who, and why), so the strategy or workflow driving the round decides what to do next.

:class:`RoundDriver` is what a strategy sees of a round: the global state, the round's seeded context, and
:meth:`RoundDriver.run`, which runs a stage over the workers still standing. The survivor set only shrinks; a
stage that ends with fewer survivors than its minimum raises :class:`~fedlink.server.errors.NotEnoughWorkers`
naming who dropped at which stage. Every worker's part in every stage is kept as a :class:`WorkerOutcome`, the
lines of ``workers.jsonl``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from fedlink.protocol.errors import ProtocolError, RemoteError, SessionClosed
from fedlink.protocol.messages import Message, ModelSpec, RoundEnd, TrainingPlan
from fedlink.protocol.session import Inbound
from fedlink.protocol.spill import Spill
from fedlink.protocol.tensors import State, StateHeader, header_of

from .errors import InvalidUpdate, NotEnoughWorkers
from .remote import RemoteWorker
from .strategy.base import Aggregation, RoundContext
from .transfer import TransferFormat

__all__ = [
    "RoundObserver",
    "StageCall",
    "Stage",
    "WorkerOutcome",
    "StageOutcome",
    "run_stage",
    "RoundDriver",
]

log = logging.getLogger("fedlink.server")

R = TypeVar("R")

#: Error codes by which a worker says its operator's rules refused the request (not a fault of the worker).
POLICY_CODES = frozenset({"model_not_allowed", "plugin_not_allowed", "policy", "policy_refused"})


class RoundObserver(Protocol):
    def worker_status(self, server_round: int, worker: str, status: str, detail: str = "") -> None: ...


@dataclass
class WorkerOutcome:
    """One worker's part in one stage of a round: a line of ``workers.jsonl``."""

    worker: str
    stage: str = "train"
    status: str = "dropped"  # "ok" or "dropped"
    reason: str = ""
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    seconds: float = 0.0
    download_bytes: int = 0  # tensor payload sent to the worker in this stage
    upload_bytes: int = 0  # tensor payload received from it, as it travelled (compressed)
    spilled_bytes: int = 0  # of those, received to disk rather than memory (limits.spill_bytes)

    def record(self, server_round: int) -> dict[str, Any]:
        return {
            "round": server_round,
            "worker": self.worker,
            "stage": self.stage,
            "status": self.status,
            "reason": self.reason,
            "samples": self.num_samples,
            "seconds": round(self.seconds, 6),
            **({"download_bytes": self.download_bytes} if self.download_bytes else {}),
            **({"upload_bytes": self.upload_bytes} if self.upload_bytes else {}),
            **({"spilled_bytes": self.spilled_bytes} if self.spilled_bytes else {}),
            "metrics": dict(self.metrics),
        }


@dataclass
class StageCall:
    """What one worker is sent: a message, and optionally a state announced with it."""

    message: Message
    state: Mapping[str, torch.Tensor] | None = None
    header: StateHeader | None = None


class Stage(ABC, Generic[R]):
    """One exchange of a round. ``timeout`` is each worker's own budget in seconds, from its request's dispatch."""

    def __init__(self, name: str, *, timeout: float, min_survivors: int = 1) -> None:
        self.name = name
        self.timeout = timeout
        self.min_survivors = min_survivors

    def begin(self, workers: Sequence[RemoteWorker]) -> None:
        """Called once with the workers of this stage, in configured order, before any request goes out."""

    @abstractmethod
    def request(self, server_round: int, worker: RemoteWorker) -> StageCall: ...

    @abstractmethod
    async def accept(self, worker: RemoteWorker, inbound: Inbound, outcome: WorkerOutcome, deadline: float) -> R:
        """Check the answer, fetch what it announced, and return the stage's result for this worker.

        Raise :class:`~fedlink.server.errors.InvalidUpdate` (or let a ProtocolError through) to drop the worker;
        ``deadline`` is the worker's own, as an event-loop time.
        """

    def failed(self, worker: RemoteWorker) -> None:
        """Called when ``worker`` dropped out of this stage, whatever the reason (frees its place in a fold)."""

    def describe_timeout(self) -> str:
        return f"missed the {self.name} deadline ({self.timeout:g}s)"


@dataclass
class StageOutcome(Generic[R]):
    stage: str
    results: dict[str, R]  # in configured worker order
    failures: dict[str, str]  # worker -> reason
    outcomes: list[WorkerOutcome]


async def run_stage(
    server_round: int, stage: Stage[R], workers: Sequence[RemoteWorker], *, observer: RoundObserver | None = None
) -> StageOutcome[R]:
    """Send ``stage``'s request to every worker at once and take each answer as it arrives."""
    loop = asyncio.get_running_loop()
    outcomes = [WorkerOutcome(worker=w.name, stage=stage.name) for w in workers]
    results: dict[str, R] = {}
    begun = loop.time()
    stage.begin(workers)

    def note(worker: str, status: str, detail: str = "") -> None:
        if observer is not None:
            observer.worker_status(server_round, worker, status, detail)

    async def one(worker: RemoteWorker, outcome: WorkerOutcome) -> None:
        started = loop.time()
        deadline = started + stage.timeout
        inbound: Inbound | None = None
        try:
            if worker.session is None or worker.session.closed:
                raise InvalidUpdate("not connected")
            call = stage.request(server_round, worker)
            note(worker.name, stage.name if stage.name != "train" else "training")
            async with asyncio.timeout_at(deadline):
                inbound = await _ask(worker, call)
            results[worker.name] = await stage.accept(worker, inbound, outcome, deadline)
            outcome.status = "ok"
        except TimeoutError:
            outcome.reason = stage.describe_timeout()
        except (ProtocolError, InvalidUpdate) as exc:
            outcome.reason = str(exc)
            if isinstance(exc, RemoteError) and exc.code in POLICY_CODES:
                # The worker's operator refused this request: say so per worker, not as a fault of the worker.
                refused = getattr(observer, "policy_refused", None)
                if refused is not None:
                    refused(worker.name, outcome.reason)
        finally:
            outcome.seconds = loop.time() - started
            if outcome.status != "ok":
                stage.failed(worker)
                if inbound is not None:
                    await inbound.discard()
        if outcome.status == "ok":
            if stage.name == "train":
                note(worker.name, "done", f"loss {outcome.metrics.get('loss', float('nan')):.4f}")
            else:
                note(worker.name, "done", stage.name)
        else:
            log.warning("round %d: dropped worker %r at stage %s: %s", server_round, worker.name, stage.name, outcome.reason)
            note(worker.name, "dropped", outcome.reason)

    tasks = [asyncio.ensure_future(one(w, o)) for w, o in zip(workers, outcomes)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ordered = {w.name: results[w.name] for w in workers if w.name in results}
    failures = {o.worker: o.reason for o in outcomes if o.status != "ok"}
    finished = getattr(observer, "stage_finished", None)
    if finished is not None:
        finished(server_round, stage.name, loop.time() - begun, outcomes)
    return StageOutcome(stage.name, ordered, failures, outcomes)


async def _ask(worker: RemoteWorker, call: StageCall) -> Inbound:
    """Send ``call``; if the worker's session ended under the request and the worker already has another (a
    simulation host failed and its virtual workers moved to a live one), ask once more there, within the same
    deadline: the answer is the same, since a request carries its own seed."""
    session = worker.session
    assert session is not None
    try:
        return await session.request(call.message, state=call.state, header=call.header, timeout=None)
    except SessionClosed:
        moved = worker.session
        if moved is None or moved is session or moved.closed:
            raise
        log.warning("%s: connection ended under its %s request; asking again on its new one", worker.name, call.message.type)
        return await moved.request(call.message, state=call.state, header=call.header, timeout=None)


class RoundDriver:
    """One round as a strategy drives it: the state, the context, and the stages run so far."""

    def __init__(
        self,
        server_round: int,
        workers: Sequence[RemoteWorker],
        *,
        global_state: State,
        header: StateHeader,
        update_header: StateHeader,
        model: ModelSpec,
        plan: TrainingPlan,
        context: RoundContext,
        run_id: str,
        seed: int,
        timeout: float,
        min_workers: int,
        concurrent_uploads: int = 4,
        max_samples: Mapping[str, int] | None = None,
        observer: RoundObserver | None = None,
        max_update_norm: float = math.inf,
        max_weight_share: float = 1.0,
        transfer: TransferFormat | None = None,
        spill: Spill | None = None,
    ) -> None:
        self.server_round = server_round
        self.selected = list(workers)
        self.survivors = list(workers)
        self.global_state = global_state
        self.header = header
        self.update_header = update_header
        self.model = model
        self.plan = plan
        self.context = context
        self.run_id = run_id
        self.seed = seed
        self.timeout = timeout
        self.min_workers = min_workers
        self.concurrent_uploads = concurrent_uploads
        self.max_samples = dict(max_samples or {})
        self.max_update_norm = max_update_norm
        self.max_weight_share = max_weight_share
        self.transfer = transfer
        self.spill = spill
        self.observer = observer
        self.outcomes: list[WorkerOutcome] = []
        self.stages: list[StageOutcome[Any]] = []

    async def run(self, stage: Stage[R]) -> StageOutcome[R]:
        """Run ``stage`` over the survivors; those that fail it are out of the round."""
        outcome = await run_stage(self.server_round, stage, self.survivors, observer=self.observer)
        self.stages.append(outcome)
        self.outcomes.extend(outcome.outcomes)
        self.survivors = [w for w in self.survivors if w.name in outcome.results]
        if len(self.survivors) < stage.min_survivors:
            reasons = "; ".join(f"{o.worker}: {o.reason} (at {o.stage})" for o in self.outcomes if o.status != "ok")
            raise NotEnoughWorkers(
                f"round {self.server_round}: only {len(self.survivors)} of {len(self.selected)} workers answered "
                f"stage {stage.name}, which needs {stage.min_survivors}"
                + (" (sampling.min_workers)" if stage.name == "train" else "")
                + (f" ({reasons})" if reasons else "")
            )
        return outcome

    def note_failure(self, worker: str, stage: str, reason: str) -> None:
        """Drop ``worker`` after its stage ended (its answer passed the stage but failed the workflow's check)."""
        for outcome in self.outcomes:
            if outcome.worker == worker and outcome.stage == stage:
                outcome.status, outcome.reason = "dropped", reason
        self.survivors = [w for w in self.survivors if w.name != worker]
        log.warning("round %d: dropped worker %r at stage %s: %s", self.server_round, worker, stage, reason)

    def train_stage(
        self, aggregation: Aggregation, *, plan: TrainingPlan | None = None, min_survivors: int | None = None,
        timeout: float | None = None, state: State | None = None, update_header: StateHeader | None = None,
    ) -> "Stage[None]":
        """The built-in train stage: each update checked and folded into ``aggregation`` in configured order.

        ``state`` replaces the global state sent to the workers (the global state plus tensors the plan's hooks
        declared, e.g. SCAFFOLD's control variate); ``update_header`` replaces the expected update (the update
        plus the tensors those hooks append). Both default to the round's.
        """
        from .train_stage import TrainStage

        return TrainStage(
            aggregation,
            model=self.model,
            plan=plan or self.plan,
            global_state=self.global_state if state is None else state,
            header=self.header if state is None else header_of(state),
            update_header=self.update_header if update_header is None else update_header,
            seed=self.seed,
            run_id=self.run_id,
            max_samples=self.max_samples,
            concurrent_uploads=self.concurrent_uploads,
            timeout=self.timeout if timeout is None else timeout,
            min_survivors=self.min_workers if min_survivors is None else min_survivors,
            observer=self.observer,
            max_update_norm=self.max_update_norm,
            max_weight_share=self.max_weight_share,
            transfer=self.transfer,
            spill=self.spill,
        )

    async def end(self) -> None:
        """Tell every selected worker the round is over (best effort), so it drops the round's context."""

        async def tell(worker: RemoteWorker) -> None:
            if worker.session is None or worker.session.closed:
                return
            try:
                async with asyncio.timeout(2.0):
                    await worker.session.send(RoundEnd(round=self.server_round, run=self.run_id, worker=worker.route))
            except (TimeoutError, ProtocolError):
                pass

        await asyncio.gather(*(tell(w) for w in self.selected))

