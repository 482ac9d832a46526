"""The ``secure_aggregation:`` section of a job: its keys, defaults and what it refuses at load time."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SecureAggregationConfig", "SecureTimeouts", "SECURE_STRATEGIES_REFUSED"]

#: Strategies that need every update on its own (robust rules, asynchronous buffers): under secure aggregation the
#: coordinator only ever sees the sum, so these would silently turn into a plain mean. They are refused instead.
SECURE_STRATEGIES_REFUSED = frozenset({"median", "trimmed_mean", "krum", "multi_krum", "fedbuff"})


class SecureTimeouts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: float = Field(30.0, gt=0, description="seconds per worker for each of the two key stages")
    masked_input: float | None = Field(None, gt=0, description="seconds per worker to train and mask [default: timeouts.round]")
    unmask: float = Field(30.0, gt=0, description="seconds per worker to answer the unmask stage")


class SecureAggregationConfig(BaseModel):
    """Secure aggregation (Bonawitz et al. 2017; Bell et al. 2020): the coordinator learns only the sum.

    Defaults: ``neighbours`` is every other selected worker up to 50 workers, else the smallest k the SecAgg+
    analysis allows for n; ``threshold`` is ``floor((k + colluding + 1) / 2) + 1``, the smallest number of shares
    that both keeps any ``colluding`` workers (plus the coordinator) from rebuilding a secret and lets the
    survivors rebuild it; ``min_survivors`` is the fewest workers a round may end with and still release its sum.
    """

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(gt=0, description="L2 norm every update is clipped to before quantisation (required)")
    bits: int = Field(32, ge=8, le=32, description="the modulus is 2^bits; values travel bit-packed at this width")
    neighbours: int | None = Field(None, ge=2, description="workers each one masks with [default: see above]")
    threshold: int | None = Field(None, ge=2, description="shares needed to rebuild a secret [default: see above]")
    colluding: int = Field(0, ge=0, description="workers assumed to collude with the coordinator")
    min_survivors: int | None = Field(None, ge=1, description="fewest workers that may release a sum [default: see above]")
    weight_cap: int | None = Field(
        None, ge=1,
        description="public cap on one worker's sample weight [default: the largest shard a selected worker announced]",
    )
    timeouts: SecureTimeouts = SecureTimeouts()
