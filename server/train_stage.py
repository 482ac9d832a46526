"""The built-in train stage: every selected worker trains on the global state; updates fold in configured order.

Each worker's answer is checked the moment it arrives (does it answer this request, with a plausible sample
count?); its update is then pulled as soon as :class:`~.fold.OrderedFold` admits it (at most
``limits.concurrent_uploads`` updates in flight or waiting), scanned once (:func:`~.aggregate.scan_update`: its
norm, NaN and infinity, each tensor's largest value) and folded into the strategy's aggregation when its turn in
the configured order comes. An uncompressed update of at least ``limits.spill_bytes`` goes to an unnamed
temporary file as it arrives and is scanned and folded from there a slice at a time
(:mod:`fedlink.protocol.spill`), so the coordinator never holds it whole. The worker's deadline covers its training
and its upload; time spent waiting for a place to upload is the coordinator's doing and is added back.

A worker cannot poison the round with magnitude or with its sample count. An update whose L2 norm (float64,
over its floating-point tensors) exceeds ``limits.max_update_norm`` is refused, naming the worker and the norm;
one that would still overflow the running sum is refused by the fold itself (:class:`~.aggregate.WeightedSum`),
leaving the sum as it was. The weight an update gets is its reported sample count capped by what the operator
allows (:func:`fold_weights`): the worker's hello, its ``max_samples`` in the config, what the plan can train on,
and ``sampling.max_weight_share``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

from fedlink.collector import return_free_memory
from fedlink.protocol.messages import ModelSpec, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.session import Inbound
from fedlink.protocol.spill import Spill
from fedlink.protocol.tensors import State, StateHeader

from .aggregate import AccumulatorOverflow, BrokenSum, Scanned, UpdateScan, scan_update
from .engine import RoundObserver, Stage, StageCall, WorkerOutcome
from .errors import InvalidUpdate, RoundRefused
from .fold import OrderedFold
from .remote import RemoteWorker
from .transfer import DownloadCache, TransferFormat, WorkerTransfer
from .strategy import Aggregation, ClientUpdate

#: Updates smaller than this are scanned on the event loop (about a millisecond of work at most).
_SCAN_INLINE_BYTES = 1 << 20

__all__ = ["TrainStage", "check_result", "check_update", "derive_seed", "share_cap", "fold_weights"]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run's seed and a path (round, worker...), so every random choice is reproducible."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


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


def check_update(state: Mapping[str, torch.Tensor], *, max_update_norm: float) -> UpdateScan:
    """Refuse an update holding NaN or infinity, or whose L2 norm exceeds ``max_update_norm``, from one scan
    (:func:`~.aggregate.scan_update`, which leaves its peaks with a scanned or spilled state for the fold)."""
    scan = scan_update(state)
    if scan.non_finite:
        raise InvalidUpdate(f"NaN or infinite values in {', '.join(scan.non_finite[:5])}")
    if not scan.norm <= max_update_norm:
        raise InvalidUpdate(f"update norm {scan.norm:.4g} exceeds limits.max_update_norm ({max_update_norm:.4g})")
    return scan


def share_cap(counts: Sequence[float], share: float) -> float:
    """The weight cap ``c`` under which no worker has more than ``share`` of the total of ``min(count, c)``.

    Water-filling: the largest counts are lowered to a common ``c`` with ``c = share * sum(min(count, c))``. The
    rule applies only when it can be met without equal weights for all, i.e. with more than ``1 / share`` workers
    (three or more for 0.5); otherwise, and when no count is above its share, the cap is infinite.
    """
    n = len(counts)
    if share >= 1 or n * share <= 1:
        return math.inf
    ordered = sorted((float(c) for c in counts), reverse=True)
    total = sum(ordered)
    if ordered[0] <= share * total:
        return math.inf
    suffix = [0.0] * (n + 1)  # summed from the smallest up, so a huge claim cannot swallow the others
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + ordered[i]
    for capped in range(1, n):
        rest = suffix[capped]
        if share * capped >= 1:
            break
        cap = share * rest / (1 - share * capped)
        if ordered[capped] <= cap:
            return cap
    return ordered[-1]


def fold_weights(
    workers: Sequence[RemoteWorker], *, plan: TrainingPlan, max_samples: Mapping[str, int], max_weight_share: float
) -> dict[str, int]:
    """The most weight each selected worker's update may carry in this round's fold, known before the round.

    A worker's expected count is the smallest of its hello's dataset size, its configured ``max_samples`` and
    what the plan lets it train on (``max_steps * batch_size``, except for gradients, which cover the shard); the
    share cap (:func:`share_cap`) is computed over those expected counts. It must be known before the first
    update folds (updates fold as they arrive, in configured order), so it is relative to the *selected*
    workers: when some drop out of the round, the others' shares of what remains can exceed the cap.
    """
    expected: dict[str, int] = {}
    for worker in workers:
        count = min(worker.num_samples, max_samples.get(worker.name, worker.num_samples))
        if plan.update != "gradients" and plan.max_steps is not None:
            count = min(count, plan.max_steps * plan.batch_size)
        expected[worker.name] = max(count, 1)
    cap = share_cap(list(expected.values()), max_weight_share)
    return {name: max(1, min(count, math.floor(cap))) if math.isfinite(cap) else count for name, count in expected.items()}


class TrainStage(Stage[None]):
    def __init__(
        self,
        aggregation: Aggregation,
        *,
        model: ModelSpec,
        plan: TrainingPlan,
        global_state: State,
        header: StateHeader,
        update_header: StateHeader,
        seed: int,
        run_id: str,
        timeout: float,
        min_survivors: int,
        concurrent_uploads: int = 4,
        max_samples: Mapping[str, int] | None = None,
        observer: RoundObserver | None = None,
        name: str = "train",
        max_update_norm: float = math.inf,
        max_weight_share: float = 1.0,
        transfer: TransferFormat | None = None,
        spill: Spill | None = None,
    ) -> None:
        super().__init__(name, timeout=timeout, min_survivors=min_survivors)
        self.aggregation = aggregation
        self.model = model
        self.plan = plan
        self.global_state = global_state
        self.header = header
        self.update_header = update_header
        self.seed = seed
        self.run_id = run_id
        self.concurrent_uploads = concurrent_uploads
        self.max_samples = dict(max_samples or {})
        self.observer = observer
        self.max_update_norm = max_update_norm
        self.max_weight_share = max_weight_share
        self.transfer = transfer or TransferFormat()
        self.spill = spill
        self._download = DownloadCache(global_state, header)
        self._transfers: dict[str, WorkerTransfer] = {}
        self._sent_bytes: dict[str, int] = {}
        self._requests: dict[str, TrainRequest] = {}
        self._fold: OrderedFold | None = None
        self._weights: dict[str, int] = {}

    def begin(self, workers: Sequence[RemoteWorker]) -> None:
        self._fold = OrderedFold([w.name for w in workers], capacity=self.concurrent_uploads)
        self._weights = fold_weights(
            workers, plan=self.plan, max_samples=self.max_samples, max_weight_share=self.max_weight_share
        )

    def describe_timeout(self) -> str:
        return f"missed the round deadline (timeouts.round, {self.timeout:g}s)"

    def request(self, server_round: int, worker: RemoteWorker) -> StageCall:
        transfer = self.transfer.negotiate(worker, self.plan, self.update_header)
        state, header = self._download.get(transfer.download)
        cache, omitted = self.transfer.cache_for(worker, transfer.download)
        if omitted:  # unchanged since the state this worker keeps
            state = {name: value for name, value in state.items() if name not in omitted}
            header = StateHeader(tensors=tuple(t for t in header.tensors if t.name not in omitted))
        self._sent_bytes[worker.name] = header.nbytes
        request = TrainRequest(
            round=server_round,
            task_id=f"r{server_round}-{worker.name}",
            model=self.model,
            plan=transfer.plan.model_copy(update={"seed": derive_seed(self.seed, server_round, worker.name)}),
            run=self.run_id,
            worker=worker.route,
            cache=cache,
        )
        self._requests[worker.name] = request
        self._transfers[worker.name] = transfer
        return StageCall(request, state, header)

    async def accept(self, worker: RemoteWorker, inbound: Inbound, outcome: WorkerOutcome, deadline: float) -> None:
        assert self._fold is not None
        result = inbound.message
        outcome.download_bytes = self._sent_bytes[worker.name]
        if not isinstance(result, TrainResult):
            raise InvalidUpdate(f"answered a train request with {result.type!r}")
        outcome.train_seconds = result.train_seconds
        check_result(result, request=self._requests[worker.name], max_samples=worker.num_samples)
        self.transfer.confirm(worker.name)  # it trained on what it was sent: it keeps that state now
        waited = await self._fold.admit(worker.name)
        if self.observer is not None:
            self.observer.worker_status(self._requests[worker.name].round, worker.name, "uploading", "")
        transfer = self._transfers[worker.name]
        async with asyncio.timeout_at(deadline + waited):
            received, outcome.spilled_bytes = await transfer.receive(inbound, self.spill)
        outcome.upload_bytes = transfer.wire_header.nbytes
        received = await transfer.dense(received)
        if self.transfer.folds_frozen:
            state = transfer.complete(received, self.global_state, result.update)
        else:
            state = self.transfer.for_fold(transfer.update_header, received)
        del received
        # One pass, a slice at a time: the norm, NaN or infinity by tensor, and each tensor's peak for the fold
        # (kept with the update). A small update is scanned at once: a thread hand-off would cost more than the scan.
        if isinstance(state, dict):
            state = Scanned(state)
        if transfer.sent_header.nbytes < _SCAN_INLINE_BYTES:  # its size decoded: top-k's wire is 2% of it
            check_update(state, max_update_norm=self.max_update_norm)
        else:
            await asyncio.to_thread(check_update, state, max_update_norm=self.max_update_norm)
        weight = min(result.num_samples, self._weights.get(worker.name, result.num_samples))
        await self._fold.turn(worker.name)
        try:
            self.aggregation.add(
                ClientUpdate(
                    worker=worker.name, kind=result.update, num_samples=weight, state=state, metrics=result.metrics,
                )
            )
        except AccumulatorOverflow as exc:
            raise InvalidUpdate(f"update refused, it would overflow the round's sum: {exc}") from None
        except BrokenSum as exc:
            raise RoundRefused(f"round refused: {worker.name}'s update could not be folded: {exc}") from None
        finally:
            if outcome.spilled_bytes:
                return_free_memory()  # the slices and frames it took (see fedlink.collector)
        del state
        self._fold.release(worker.name)
        outcome.num_samples = weight
        outcome.metrics = dict(result.metrics)

    def failed(self, worker: RemoteWorker) -> None:
        if self._fold is not None:
            self._fold.release(worker.name)
