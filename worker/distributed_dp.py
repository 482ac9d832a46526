"""Distributed differential privacy on a worker: discrete Gaussian noise in the quantised update, before masking.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML 2021. Under secure aggregation the coordinator only ever sees the sum, so each worker adds its
share of the noise itself: discrete Gaussian with ``sigma = z * levels / sqrt(min_survivors)`` quantisation steps
(:func:`fedlink.privacy.distributed.worker_noise_sigma`), so that any ``min_survivors`` contributions sum to noise
of at least ``z * clip_norm`` in the update's units; the protocol releases nothing with fewer. The noise comes
from a fresh secret each time (``secrets``): a retried round never repeats it, and nobody, this worker included,
can subtract it later. Noise added to the wrapped vector modulo ``2^bits`` is the noise added before wrapping; the
coordinator chose ``levels`` with room for the noised sum (:func:`fedlink.server.privacy.distributed_levels`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedlink.privacy import NoiseSource, PrivacyError
from fedlink.privacy.distributed import discrete_noise_vector, worker_noise_sigma
from fedlink.protocol.messages import PrivacyPlan
from fedlink.secagg import QuantSpec

from .errors import BadRequest

__all__ = ["add_distributed_noise"]


def add_distributed_noise(
    vector: NDArray[np.uint32], *, privacy: PrivacyPlan, spec: QuantSpec, update_length: int, server_round: int,
    min_survivors: int,
) -> NDArray[np.uint32]:
    """``vector`` with discrete Gaussian noise on its first ``update_length`` coordinates (the update), mod 2^bits."""
    if privacy.noise_multiplier is None:
        raise BadRequest("distributed DP needs the round's noise_multiplier in the plan")
    try:
        sigma = worker_noise_sigma(
            noise_multiplier=privacy.noise_multiplier, clip_norm=spec.clip_norm, scale=spec.levels / spec.clip_norm,
            min_survivors=min_survivors,
        )
    except PrivacyError as exc:
        raise BadRequest(str(exc)) from exc
    noise = discrete_noise_vector(NoiseSource.create(), server_round=server_round, length=update_length, sigma=sigma)
    out = vector.copy()
    mask = (1 << spec.bits) - 1
    noised = (out[:update_length].astype(np.int64) + noise) & mask
    out[:update_length] = noised.astype(np.uint32)
    return out
