"""The ``privacy:`` section of a job configuration (absent = no differential privacy).

``noise_multiplier`` is the ratio of the noise's standard deviation to the L2 bound ``clip_norm`` on the sum
(central, distributed) or on each step's gradient sum (local). With ``target_epsilon`` instead, the multiplier is
solved for the planned rounds by :func:`fedlink.privacy.ledger.solve_noise_multiplier`. ``max_epsilon`` stops a run
before the round that would exceed it. Messages name the key, the value and what would be accepted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PrivacyMode", "AccountantName", "AdaptiveClippingConfig", "PrivacyConfig", "DEFAULT_NOISE_MULTIPLIER"]

PrivacyMode = Literal["central", "local", "distributed"]
AccountantName = Literal["rdp", "prv"]
DEFAULT_NOISE_MULTIPLIER = 1.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdaptiveClippingConfig(_Section):
    """Quantile-based clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021); ``clip_norm`` is the start."""

    target_quantile: float = Field(0.5, gt=0, lt=1, description="share of updates meant to fall under the clip")
    learning_rate: float = Field(0.2, gt=0, le=10, description="geometric step of the clip per round")
    count_noise: float | None = Field(
        None,
        gt=0,
        description="std of the noise on the count of unclipped updates; default: expected cohort size / 20",
    )


class PrivacyConfig(_Section):
    mode: PrivacyMode = "central"
    clip_norm: float = Field(1.0, gt=0, description="L2 bound per update (central, distributed) or per example (local)")
    noise_multiplier: float | None = Field(None, gt=0, le=1e4, description="noise std / clip_norm")
    target_epsilon: float | None = Field(None, gt=0, le=1e4, description="solve noise_multiplier for the planned rounds")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0, description="stop before a round would spend more than this")
    adaptive_clipping: AdaptiveClippingConfig | None = None
    accountant: AccountantName = "rdp"

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                f"privacy.noise_multiplier ({self.noise_multiplier}) and privacy.target_epsilon "
                f"({self.target_epsilon}) exclude each other: give one (the multiplier is solved from the target)"
            )
        if self.target_epsilon is not None and self.max_epsilon is not None and self.target_epsilon > self.max_epsilon:
            raise ValueError(
                f"privacy.target_epsilon ({self.target_epsilon}) is above privacy.max_epsilon ({self.max_epsilon}): "
                "the run would stop before reaching it; lower the target or raise the budget"
            )
        if self.adaptive_clipping is not None and self.mode == "local":
            raise ValueError(
                "privacy.adaptive_clipping applies to the clipping of whole updates (mode central or distributed); "
                "in mode local each example's gradient is clipped to privacy.clip_norm: remove adaptive_clipping"
            )
        return self

    @property
    def fixed_noise_multiplier(self) -> float | None:
        """The configured multiplier (the default when neither it nor ``target_epsilon`` is given), else None."""
        if self.target_epsilon is not None:
            return None
        return self.noise_multiplier if self.noise_multiplier is not None else DEFAULT_NOISE_MULTIPLIER
