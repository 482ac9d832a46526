"""A secure-aggregation round over the engine: advertise keys, share keys, masked input, unmask.

The coordinator drives :class:`fedlink.secagg.ServerSecAgg` through four stages, each with its own deadline
(``secure_aggregation.timeouts``) and the protocol's minimum of survivors; it relays the encrypted share bundles
between stages and only ever holds the running sum of masked vectors. The result is the sample-weighted mean of
the contributors' clipped, quantised deltas (and their weighted mean loss), decoded from the unmasked sum; the
strategy then takes it exactly as it would take the mean of plain updates, by folding it as one update whose
weight is the total. Strategies that need each update on its own are refused at config time
(:data:`.secure_config.SECURE_STRATEGIES_REFUSED`).

Too few survivors at any stage releases nothing: the round fails with a message naming who dropped at which stage,
and the coordinator retries it (``timeouts.round_retries``) from its first stage with fresh keys. A round cut short
by a coordinator crash is rerun from its start on ``--resume``; the round's secrets live only in the workers' and
the coordinator's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from fedlink.protocol.tensors import State, StateHeader, TensorSpec
from fedlink.secagg import (
    AdvertiseResult,
    MaskedInputResult,
    QuantSpec,
    SecAggError,
    ServerSecAgg,
    ShareKeysResult,
    TooFewSurvivors,
    UnmaskResult,
    decode_sum,
    layout_of,
    resolve_params,
    tensor_to_packed,
)

from .engine import RoundDriver, StageOutcome
from .errors import ConfigError, NotEnoughWorkers
from .plugin_stage import PluginAnswer, PluginStage
from .privacy import RunPrivacy, distributed_levels
from .secure_config import SecureAggregationConfig
from .strategy.base import Aggregate, ClientUpdate, Strategy, as_aggregate
from .strategy.updates import MeanAggregation
from .train_stage import derive_seed

__all__ = ["SecureRound"]


class SecureRound:
    """Runs one strategy's rounds under secure aggregation; ``run(driver)`` replaces the strategy's own round."""

    def __init__(self, config: SecureAggregationConfig, strategy: Strategy) -> None:
        self.config = config
        self.strategy = strategy
        self.privacy: RunPrivacy | None = None  # distributed DP: set by the coordinator for mode distributed

    def check(self, global_state: State) -> None:
        """Refuse, before the first round, a strategy whose round is not a weighted mean of the updates."""
        probe = self.strategy.begin_round(0, global_state)
        if not isinstance(probe, MeanAggregation):
            raise ConfigError(
                f"strategy {self.strategy.name!r} does not aggregate by a weighted mean of the updates, so it cannot "
                "run under secure_aggregation (the coordinator sees only the sum)"
            )

    async def run(self, driver: RoundDriver) -> Aggregate:
        config = self.config
        ids = [w.name for w in driver.survivors]
        layout = layout_of(driver.global_state, metrics=("loss",))
        try:
            params = resolve_params(
                num_selected=len(ids), length=layout.length, bits=config.bits, neighbours=config.neighbours,
                threshold=config.threshold, colluding=config.colluding, min_survivors=config.min_survivors,
            )
            cap = config.weight_cap or max((w.num_samples for w in driver.survivors), default=1) or 1
            spec = QuantSpec.for_workers(len(ids), bits=params.bits, clip_norm=config.clip_norm, weight_cap=float(cap))
            # distributed DP: levels that leave the field room for the workers' noise
            private = self.privacy is not None and self.privacy.mode == "distributed"
            if private:
                assert self.privacy is not None and self.privacy.noise_multiplier is not None
                spec = QuantSpec(
                    bits=params.bits, clip_norm=config.clip_norm, contributors=len(ids), weight_cap=float(cap),
                    levels=distributed_levels(
                        bits=params.bits, contributors=len(ids), noise_multiplier=self.privacy.noise_multiplier,
                        min_survivors=params.min_survivors,
                    ),
                )
        except SecAggError as exc:
            raise ConfigError(f"secure_aggregation with {len(ids)} workers: {exc}") from exc
        server = ServerSecAgg(round=driver.server_round, params=params, selected=ids)
        least = params.min_survivors

        def stage(name: str, handler: str, result: type[BaseModel], payload: Callable[[Any], Mapping[str, Any]], *,
                  timeout: float, **extra: Any) -> PluginStage:
            extra.setdefault("min_survivors", least)
            return PluginStage(
                name, handler=handler, result_model=result, payload=payload, run_id=driver.run_id, timeout=timeout,
                **extra,
            )

        def feed(outcome: StageOutcome[PluginAnswer], receive: Callable[[str, Any], None]) -> None:
            for worker, answer in outcome.results.items():
                try:
                    receive(worker, answer.result)
                except SecAggError as exc:  # off-protocol: that worker is out, the others go on
                    driver.note_failure(worker, outcome.stage, str(exc))

        def requests(make: Callable[[], Mapping[str, BaseModel]]) -> Mapping[str, BaseModel]:
            try:
                return make()
            except TooFewSurvivors as exc:
                raise NotEnoughWorkers(f"round {driver.server_round}: secure aggregation released nothing: {exc}") from exc

        advertise = server.advertise_request().model_dump(mode="json")
        keys = config.timeouts.keys
        feed(await driver.run(stage("advertise", "secagg.advertise", AdvertiseResult, lambda w: advertise, timeout=keys)),
             server.receive_advertise)
        share = requests(server.share_keys_requests)
        feed(await driver.run(stage("share_keys", "secagg.share_keys", ShareKeysResult,
                                    lambda w: share[w.name].model_dump(mode="json"), timeout=keys)),
             server.receive_shares)
        masked = requests(server.masked_input_requests)
        plan = driver.plan.model_copy(update={"update": "delta"})

        def masked_payload(worker: Any) -> Mapping[str, Any]:
            return {
                "shares": masked[worker.name].model_dump(mode="json"),
                "model": driver.model.model_dump(mode="json"),
                "plan": plan.model_copy(update={"seed": derive_seed(driver.seed, driver.server_round, worker.name)})
                .model_dump(mode="json"),
                "spec": spec.model_dump(mode="json"),
                "task_id": f"r{driver.server_round}-secure-{worker.name}",
            }

        packed_bytes = (layout.length * params.bits + 7) // 8
        packed_header = StateHeader(tensors=(TensorSpec(name="masked", dtype="uint8", shape=(packed_bytes,)),))
        outcome = await driver.run(stage(
            "train", "secagg.masked_input", MaskedInputResult, masked_payload,
            timeout=config.timeouts.masked_input or driver.timeout,
            state=driver.global_state, header=driver.header, result_header=packed_header,
        ))
        for worker, answer in outcome.results.items():
            assert answer.state is not None
            try:
                assert isinstance(answer.result, MaskedInputResult)
                server.receive_masked(worker, answer.result, tensor_to_packed(answer.state["masked"]))
            except SecAggError as exc:
                driver.note_failure(worker, "train", str(exc))
        unmask = requests(server.unmask_requests)
        # Workers lost from here on still count in the sum (their self masks are rebuilt from their neighbours'
        # shares), so this stage's floor is the protocol's threshold, checked by ``finish``.
        feed(await driver.run(stage("unmask", "secagg.unmask", UnmaskResult, lambda w: unmask[w.name].model_dump(mode="json"),
                                    timeout=config.timeouts.unmask, min_survivors=1)),
             server.receive_unmask)
        try:
            total = server.finish()
        except TooFewSurvivors as exc:
            raise NotEnoughWorkers(f"round {driver.server_round}: secure aggregation released nothing: {exc}") from exc
        decoded = decode_sum(total, layout=layout, spec=spec)
        mean: State = dict(decoded.update)
        if private:  # distributed DP: the noised sum over the expected cohort, a fixed denominator
            assert self.privacy is not None
            scale = len(server.contributors) / self.privacy.expected_cohort
            mean = {name: value * scale for name, value in mean.items()}
        for name, value in driver.global_state.items():
            if not value.is_floating_point():
                mean[name] = value  # integer buffers are not in the vector: they keep the global values
        aggregation = self.strategy.start_round(driver.context, driver.global_state)
        weight = max(1, round(decoded.weight))
        aggregation.add(ClientUpdate(worker="secure-sum", kind="delta", num_samples=weight, state=mean))
        result = as_aggregate(aggregation.finish())
        result.metrics.update({
            "secure_contributors": float(len(server.contributors)),
            "secure_samples": decoded.weight,
            "secure_train_loss": decoded.metrics.get("loss", float("nan")),
        })
        if private:  # distributed DP: the workers sent weight 1 and no loss; account the release
            assert self.privacy is not None
            result.metrics.update(self.privacy.step())
            result.metrics.update(secure_samples=float(len(server.contributors)), secure_train_loss=float("nan"))
        return result
