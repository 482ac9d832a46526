"""Central differential privacy: DP-FedAvg's aggregation with clipping, fixed denominator and keyed noise.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018: each
worker's update (its delta) is scaled to L2 norm at most ``clip_norm`` over all its floating-point tensors, the
clipped updates are summed, Gaussian noise of std ``z * clip_norm`` is added to the sum, and the sum is divided by
the *expected* cohort size, a constant, so that one worker's presence changes the released mean by at most
``clip_norm / n``. Updates are weighted equally: a weight by sample count would raise that bound.

Adaptive clipping: Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021. The clip follows a target quantile of the update norms geometrically,
``C <- C * exp(-eta * (b - gamma))``, with ``b`` the share of updates under ``C``, estimated from a count noised
with std ``count_noise`` (``sigma_b``). Releasing the count spends privacy too; the paper's Theorem 1 keeps the
total at the configured multiplier ``z`` by noising the update sum with ``z_delta = (z**-2 - (2 sigma_b)**-2)**-1/2``
(:func:`effective_noise_multiplier`). The ledger therefore steps with ``z``.

Integer and bool tensors (BatchNorm's ``num_batches_tracked``) are not covered by the clip, so they are not
released: the global model keeps its own values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .config import AdaptiveClippingConfig
from .errors import PrivacyError
from .noise import NoiseSource

__all__ = [
    "UpdateLike",
    "RoundRelease",
    "clip_update",
    "update_norm",
    "effective_noise_multiplier",
    "CentralDP",
    "DPFedAvgAggregation",
]

State = dict[str, torch.Tensor]
UPDATE_PURPOSE = "central/update"
COUNT_PURPOSE = "central/clip-count"


class UpdateLike(Protocol):
    """What the aggregation reads from a worker's result (``fedlink.server.strategy.ClientUpdate`` fits)."""

    @property
    def kind(self) -> str: ...

    @property
    def state(self) -> Mapping[str, torch.Tensor]: ...


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all floating-point tensors together, computed in float64."""
    total = 0.0
    for tensor in update.values():
        if _is_float(tensor):
            total += float(torch.sum(tensor.to(torch.float64) ** 2))
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[State, float]:
    """The floating-point tensors scaled so their joint L2 norm is at most ``clip_norm``, and the norm before."""
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: t * factor for name, t in update.items() if _is_float(t)}, norm


def effective_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """The multiplier for the update sum when the clipped count is released too (Andrew et al. 2021, Thm. 1)."""
    remainder = noise_multiplier**-2 - (2 * count_noise) ** -2
    if remainder <= 0:
        raise PrivacyError(
            f"privacy.adaptive_clipping.count_noise {count_noise:g} is too small for noise_multiplier "
            f"{noise_multiplier:g}: it must exceed noise_multiplier / 2 = {noise_multiplier / 2:g} (the paper suggests "
            "the expected cohort size / 20, which needs a larger cohort)"
        )
    return float(remainder**-0.5)


@dataclass(frozen=True)
class RoundRelease:
    """What a round released besides the model, for metrics (nothing here is secret)."""

    updates: int
    clip_norm: float
    next_clip_norm: float
    unclipped_fraction: float | None  # the noised estimate, adaptive clipping only


class DPFedAvgAggregation:
    """One round of DP-FedAvg; ``add`` each update (any order the engine fixes), then ``finish`` once.

    Holds one running sum per tensor, like :class:`fedlink.server.strategy.updates.MeanAggregation`.
    """

    def __init__(
        self, owner: CentralDP, server_round: int, global_state: Mapping[str, torch.Tensor], attempt: int = 0
    ) -> None:
        self._owner = owner
        self._round = server_round
        # A retried round draws other noise: the same label twice over two different sums would cancel by subtraction.
        self._purpose = UPDATE_PURPOSE if attempt == 0 else f"{UPDATE_PURPOSE}/attempt-{attempt}"
        self._attempt = attempt
        self._global = global_state
        self._clip = owner.clip_norm
        self._sums: State = {}
        self._count = 0
        self._unclipped = 0
        self.release: RoundRelease | None = None

    def add(self, update: UpdateLike) -> None:
        if update.kind == "delta":
            delta = update.state
        elif update.kind == "weights":
            delta = {n: t - self._global[n] for n, t in update.state.items() if _is_float(t)}
        else:
            raise PrivacyError(
                f"central DP clips model deltas; update kind {update.kind!r} is not supported: "
                "set training.update to delta (or weights)"
            )
        clipped, norm = clip_update(delta, self._clip)
        if self._sums and clipped.keys() != self._sums.keys():
            raise PrivacyError("every update of a round must carry the same floating-point tensors")
        for name, tensor in clipped.items():
            acc = self._sums.get(name)
            if acc is None:  # float32 for float32/16/bfloat16 tensors: one model-sized sum, as in plain FedAvg
                self._sums[name] = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
            else:
                acc.add_(tensor.to(acc.dtype))
        self._count += 1
        self._unclipped += norm <= self._clip

    def finish_delta(self) -> State:
        """The released mean delta: ``(sum of clipped deltas + noise) / expected cohort``; float tensors only."""
        if self._count == 0:
            raise PrivacyError(f"round {self._round}: no updates to release")
        owner = self._owner
        owner.claim_round(self._round)
        std = owner.update_noise_multiplier * self._clip
        out: State = {}
        for name in list(self._sums):
            acc = self._sums.pop(name)
            noise = owner.noise.gaussian(self._round, self._purpose, name, acc.shape, std, acc.dtype)
            acc.add_(noise).div_(owner.expected_cohort)
            out[name] = acc.to(self._global[name].dtype)
        self.release = owner.record_round(self._round, self._count, self._unclipped, self._clip, self._attempt)
        return out

    def finish(self) -> State:
        """The next global state: global + released mean delta (server learning rate 1, as in the paper)."""
        delta = self.finish_delta()
        return {name: (t + delta[name] if name in delta else t) for name, t in self._global.items()}


class CentralDP:
    """DP-FedAvg across rounds: the current clip, the noise source and the adaptive clipping state.

    ``noise_multiplier`` is the ``z`` the ledger accounts; ``expected_cohort`` the fixed denominator (``q * N``
    under Poisson sampling, the cohort size for fixed cohorts). ``noise`` is the run's source, which its owner
    (the coordinator) checkpoints; :meth:`state_dict` holds only the adaptive clip.
    """

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_cohort: float,
        noise: NoiseSource,
        adaptive: AdaptiveClippingConfig | None = None,
    ) -> None:
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise PrivacyError(f"privacy.clip_norm must be positive, got {clip_norm}")
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise PrivacyError(f"privacy.noise_multiplier must be positive, got {noise_multiplier}")
        if not (expected_cohort > 0 and math.isfinite(expected_cohort)):
            raise PrivacyError(f"the expected cohort size must be positive, got {expected_cohort}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_cohort = expected_cohort
        self.adaptive = adaptive
        self.noise = noise
        self.count_noise: float | None = None
        self.update_noise_multiplier = noise_multiplier
        self.last_released = -1
        if adaptive is not None:
            given = adaptive.count_noise
            self.count_noise = given if given is not None else expected_cohort / 20
            self.update_noise_multiplier = effective_noise_multiplier(noise_multiplier, self.count_noise)

    def begin_round(
        self, server_round: int, global_state: Mapping[str, torch.Tensor], attempt: int = 0
    ) -> DPFedAvgAggregation:
        """``attempt``: how many times this round was tried before (its noise is labelled by it after the first)."""
        return DPFedAvgAggregation(self, server_round, global_state, attempt)

    def claim_round(self, server_round: int) -> None:
        """Refuse to release a round number twice: the same label gives the same noise, which two releases of
        different sums would let anyone cancel by subtraction."""
        if server_round <= self.last_released:
            raise PrivacyError(
                f"round {server_round} cannot release: round {self.last_released} already did, and noise is drawn "
                "per round number; a retried round must get a new round number"
            )
        self.last_released = server_round

    def record_round(self, server_round: int, count: int, unclipped: int, clip: float, attempt: int = 0) -> RoundRelease:
        if self.adaptive is None or self.count_noise is None:
            return RoundRelease(count, clip, clip, None)
        purpose = COUNT_PURPOSE if attempt == 0 else f"{COUNT_PURPOSE}/attempt-{attempt}"
        noise = float(self.noise.gaussian(server_round, purpose, "", (1,), self.count_noise, torch.float64))
        fraction = (unclipped + noise) / self.expected_cohort
        self.clip_norm = clip * math.exp(-self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile))
        return RoundRelease(count, clip, self.clip_norm, fraction)

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "last_released": self.last_released}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            clip, last = float(state["clip_norm"]), int(state["last_released"])
        except (KeyError, TypeError, ValueError):
            raise PrivacyError(
                f"checkpointed central DP state needs clip_norm and last_released, got {dict(state)!r}"
            ) from None
        if not (clip > 0 and math.isfinite(clip)):
            raise PrivacyError(f"checkpointed clip_norm must be positive, got {clip}")
        self.clip_norm, self.last_released = clip, last
