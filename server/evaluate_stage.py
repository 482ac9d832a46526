"""Federated evaluation: sampled workers evaluate the global model on their own shards.

The answers are combined weighted by each worker's sample count, in configured order, so the figure is the one
a central evaluation over the union of the shards would give (for loss and accuracy, which are means).
"""

from __future__ import annotations

from fedlink.protocol.messages import EvaluateRequest, EvaluateResult, ModelSpec
from fedlink.protocol.session import Inbound
from fedlink.protocol.tensors import State, StateHeader

from .engine import Stage, StageCall, WorkerOutcome
from .errors import InvalidUpdate
from .remote import RemoteWorker

__all__ = ["EvaluateStage", "weighted_evaluation"]


class EvaluateStage(Stage[EvaluateResult]):
    def __init__(
        self, *, model: ModelSpec, state: State, header: StateHeader, run_id: str, timeout: float,
        batch_size: int = 256, min_survivors: int = 1,
    ) -> None:
        super().__init__("evaluate", timeout=timeout, min_survivors=min_survivors)
        self.model = model
        self.state = state
        self.header = header
        self.run_id = run_id
        self.batch_size = batch_size
        self._requests: dict[str, EvaluateRequest] = {}

    def request(self, server_round: int, worker: RemoteWorker) -> StageCall:
        request = EvaluateRequest(
            round=server_round, task_id=f"e{server_round}-{worker.name}", model=self.model,
            batch_size=self.batch_size, run=self.run_id, worker=worker.route,
        )
        self._requests[worker.name] = request
        return StageCall(request, self.state, self.header)

    async def accept(
        self, worker: RemoteWorker, inbound: Inbound, outcome: WorkerOutcome, deadline: float
    ) -> EvaluateResult:
        result = inbound.message
        if not isinstance(result, EvaluateResult):
            raise InvalidUpdate(f"answered an evaluate request with {result.type!r}")
        request = self._requests[worker.name]
        if result.round != request.round or result.task_id != request.task_id:
            raise InvalidUpdate(f"evaluation for task {result.task_id!r}, expected {request.task_id!r}")
        if not 0 < result.num_samples <= max(worker.num_samples, 1):
            raise InvalidUpdate(f"evaluated {result.num_samples} samples but its shard holds {worker.num_samples}")
        if not (0.0 <= result.accuracy <= 1.0) or not (result.loss >= 0.0 and result.loss < float("inf")):
            raise InvalidUpdate(f"implausible evaluation (loss {result.loss!r}, accuracy {result.accuracy!r})")
        outcome.num_samples = result.num_samples
        outcome.metrics = {"loss": result.loss, "accuracy": result.accuracy}
        return result


def weighted_evaluation(results: list[EvaluateResult]) -> tuple[float, float, int]:
    """Sample-weighted mean accuracy and loss, and the number of samples, folded in the given order."""
    total = sum(r.num_samples for r in results)
    if total == 0:
        raise ValueError("no evaluation results")
    accuracy = sum(r.accuracy * r.num_samples for r in results) / total
    loss = sum(r.loss * r.num_samples for r in results) / total
    return accuracy, loss, total
