"""One synchronous federated round: select, let the strategy drive its stages, collect the report.

The stages themselves live in :mod:`.engine` (how a stage runs), :mod:`.train_stage` (the built-in train stage
and its ordered fold), :mod:`.evaluate_stage` and :mod:`.plugin_stage`; a strategy's
:meth:`~fedlink.server.strategy.Strategy.run_round` says which stages a round has.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlink.protocol.messages import ModelSpec, TrainingPlan
from fedlink.protocol.spill import Spill
from fedlink.protocol.tensors import State, StateHeader

from .engine import RoundDriver, RoundObserver, WorkerOutcome
from .remote import RemoteWorker
from .strategy import Strategy
from .strategy.base import Aggregate, RoundContext
from .train_stage import check_result, derive_seed
from .transfer import TransferFormat

log = logging.getLogger("fedlink.server")

__all__ = ["RoundObserver", "WorkerOutcome", "RoundReport", "run_round", "derive_seed", "check_result", "round_context"]


@dataclass
class RoundReport:
    server_round: int
    state: State
    outcomes: list[WorkerOutcome]  # every worker's part in every stage, in stage then worker order
    seconds: float
    wall_seconds: float = 0.0  # set by the coordinator: from the previous round's model to this one's
    metrics: dict[str, float] = field(default_factory=dict)  # what the strategy reported

    @property
    def trained(self) -> list[WorkerOutcome]:
        """The train stage's outcomes, one per selected worker."""
        return [o for o in self.outcomes if o.stage == "train"]

    @property
    def contributed(self) -> list[WorkerOutcome]:
        return [o for o in self.trained if o.status == "ok"]


def round_context(seed: int, server_round: int) -> RoundContext:
    strategy_seed = derive_seed(seed, server_round, "strategy")
    return RoundContext(server_round, strategy_seed, torch.Generator().manual_seed(strategy_seed))


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
    deadline: float | None = None,
    timeout: float | None = None,
    min_workers: int,
    run_id: str = "",
    concurrent_uploads: int = 4,
    max_samples: Mapping[str, int] | None = None,
    observer: RoundObserver | None = None,
    max_update_norm: float = math.inf,
    max_weight_share: float = 1.0,
    workflow: Callable[[RoundDriver], Awaitable[Aggregate]] | None = None,
    transfer: TransferFormat | None = None,
    spill: Spill | None = None,
) -> RoundReport:
    """Run one round of ``strategy`` over ``workers``; raises NotEnoughWorkers below a stage's floor.

    ``transfer`` is the run's compression and download dtype, negotiated per worker (plain float32 when None).
    ``spill`` says where and from what size an update is received to disk rather than memory (never when None).
    ``workflow`` replaces the strategy's own round (secure aggregation runs its four stages around the strategy).
    ``timeout`` is each worker's own budget for a stage, in seconds (``deadline``, an event-loop time, is accepted
    for callers that think in absolute time and is turned into the same budget).
    """
    started = time.perf_counter()
    if timeout is None:
        if deadline is None:
            raise TypeError("run_round needs timeout (seconds per worker) or deadline")
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
    log.info("round %d: training on %d workers (%s)", server_round, len(workers), ", ".join(w.name for w in workers))
    driver = RoundDriver(
        server_round,
        workers,
        global_state=global_state,
        header=header,
        update_header=update_header,
        model=model,
        plan=strategy.configure_train(server_round, plan),
        context=round_context(seed, server_round),
        run_id=run_id,
        seed=seed,
        timeout=timeout,
        min_workers=min_workers,
        concurrent_uploads=concurrent_uploads,
        max_samples=max_samples,
        observer=observer,
        max_update_norm=max_update_norm,
        max_weight_share=max_weight_share,
        transfer=transfer,
        spill=spill,
    )
    try:
        aggregate = await (workflow(driver) if workflow is not None else strategy.run_round(driver))
    finally:
        await driver.end()
    state = transfer.keep_frozen(aggregate.state, global_state) if transfer is not None else aggregate.state
    return RoundReport(server_round, state, driver.outcomes, time.perf_counter() - started, metrics=dict(aggregate.metrics))
