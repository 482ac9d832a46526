"""The worker's side of a secure-aggregation round: four built-in stage handlers over :mod:`fedlink.secagg`.

Each round gets one :class:`~fedlink.secagg.WorkerSecAgg`, created at the advertise stage and kept in the round's
context (so its secrets live in memory for one round only and are dropped when the round ends). The masked-input
stage trains on the announced global model with the worker's own logic (:meth:`WorkerService.train`, hooks and
all), quantises the delta with its sample weight and loss inside the vector, masks it, and answers with the
masked vector only: no sample count, no metric and no unmasked value leaves the worker.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedlink.protocol.messages import ModelSpec, TrainingPlan, TrainRequest
from fedlink.protocol.tensors import State, StateHeader
from fedlink.secagg import (
    AdvertiseRequest,
    AdvertiseResult,
    MaskedInputRequest,
    QuantSpec,
    SecAggParams,
    ShareKeysRequest,
    ShareKeysResult,
    UnmaskRequest,
    UnmaskResult,
    WorkerSecAgg,
    encode_update,
    layout_of,
    packed_to_tensor,
)

from .errors import BadRequest
from .stages import StageContext, StageHandler, register_stage

__all__ = ["SECURE_STAGES", "MaskedTrainRequest"]

_KEY = "secagg"
_PARAMS = "secagg.params"


def _machine(context: StageContext) -> WorkerSecAgg:
    machine = context.round_state.get(_KEY)
    if not isinstance(machine, WorkerSecAgg):
        raise BadRequest(f"stage {context.stage!r} of round {context.server_round} without its advertise stage")
    return machine


class Advertise(StageHandler):
    Request = AdvertiseRequest  # type: ignore[assignment]

    def handle(self, context: StageContext, request: BaseModel, state: State | None) -> tuple[BaseModel, State | None]:
        assert isinstance(request, AdvertiseRequest)
        if context.worker_id not in request.selected:
            raise BadRequest(f"this worker ({context.worker_id}) is not among the round's selected workers")
        machine = WorkerSecAgg(context.worker_id, round=context.server_round)
        context.round_state[_KEY] = machine
        context.round_state[_PARAMS] = request.params  # distributed DP sizes its noise by min_survivors
        answer: AdvertiseResult = machine.advertise(request)
        return answer, None


class ShareKeys(StageHandler):
    Request = ShareKeysRequest  # type: ignore[assignment]

    def handle(self, context: StageContext, request: BaseModel, state: State | None) -> tuple[BaseModel, State | None]:
        assert isinstance(request, ShareKeysRequest)
        answer: ShareKeysResult = _machine(context).share_keys(request)
        return answer, None


class MaskedTrainRequest(BaseModel):
    """The masked-input stage's payload: the relayed shares, and what to train and how to quantise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shares: MaskedInputRequest
    model: ModelSpec
    plan: TrainingPlan
    spec: QuantSpec
    task_id: str


class MaskedInput(StageHandler):
    Request = MaskedTrainRequest  # type: ignore[assignment]
    takes_state = True

    def expected_state(self, context: StageContext, request: BaseModel) -> StateHeader | None:
        assert isinstance(request, MaskedTrainRequest)
        service: Any = context.service
        header: StateHeader = service.check_model(request.model)
        return header

    def handle(self, context: StageContext, request: BaseModel, state: State | None) -> tuple[BaseModel, State | None]:
        assert isinstance(request, MaskedTrainRequest) and state is not None
        machine = _machine(context)
        if request.plan.update != "delta":
            raise BadRequest("secure aggregation sums deltas: the plan must ask for update 'delta'")
        train = TrainRequest(
            round=context.server_round, task_id=request.task_id, model=request.model, plan=request.plan,
            run=context.run_id,
        )
        result, delta = context.service.train(train, state, context.stop)
        layout = layout_of(state, metrics=("loss",))
        # distributed DP: equal weights and no unnoised loss in the vector, then the worker's noise
        privacy = request.plan.privacy
        private = privacy is not None and privacy.mode == "distributed"
        vector = encode_update(
            delta,
            num_samples=math.ceil(request.spec.weight_cap) if private else result.num_samples,
            metrics={"loss": 0.0 if private else float(result.metrics.get("loss", 0.0))},
            layout=layout, spec=request.spec,
        )
        if private:
            from .distributed_dp import add_distributed_noise  # imports the privacy package (Opacus) when used

            assert privacy is not None
            params = context.round_state.get(_PARAMS)
            if not isinstance(params, SecAggParams):
                raise BadRequest(f"round {context.server_round}: distributed DP without the advertise stage's parameters")
            vector = add_distributed_noise(
                vector, privacy=privacy, spec=request.spec, update_length=layout.update_length,
                server_round=context.server_round, min_survivors=params.min_survivors,
            )
        answer, packed = machine.masked_input(request.shares, vector)
        return answer, {"masked": packed_to_tensor(packed)}


class Unmask(StageHandler):
    Request = UnmaskRequest  # type: ignore[assignment]

    def handle(self, context: StageContext, request: BaseModel, state: State | None) -> tuple[BaseModel, State | None]:
        assert isinstance(request, UnmaskRequest)
        answer: UnmaskResult = _machine(context).unmask(request)
        context.round_state.pop(_KEY, None)  # the round's secrets are no longer needed
        return answer, None


SECURE_STAGES: dict[str, type[StageHandler]] = {
    "secagg.advertise": Advertise,
    "secagg.share_keys": ShareKeys,
    "secagg.masked_input": MaskedInput,
    "secagg.unmask": Unmask,
}
for _name, _cls in SECURE_STAGES.items():
    register_stage(_name, _cls)
