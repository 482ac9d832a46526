"""Distributed differential privacy: each worker noises its quantised update before secure aggregation masks it.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML 2021. The coordinator only ever sees the sum, so the noise must already be in the workers'
contributions: each adds discrete Gaussian noise (:meth:`~fedlink.privacy.noise.NoiseSource.discrete_gaussian`,
from its own secret) with parameter ``sigma_worker = z * clip_norm * scale / sqrt(min_survivors)`` in quantised
units (``scale`` = quantisation steps per unit of the update). If at least ``min_survivors`` contributions are in
the sum, its noise has standard deviation at least ``z * clip_norm * scale``; a round with fewer must release
nothing. A sum of discrete Gaussians is close to, not exactly, a discrete Gaussian; Kairouz et al. bound the
difference, which is negligible for ``sigma_worker`` of a few units or more (:func:`worker_noise_sigma` refuses
less than 1). The quantiser (randomised rounding with a norm check) belongs to secure aggregation; rounding can
raise an update's norm, which the caller accounts for in ``clip_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .errors import PrivacyError
from .noise import NoiseSource

__all__ = ["worker_noise_sigma", "add_discrete_noise", "discrete_noise_vector", "noise_headroom", "DISTRIBUTED_PURPOSE"]

DISTRIBUTED_PURPOSE = "distributed/update"


def worker_noise_sigma(*, noise_multiplier: float, clip_norm: float, scale: float, min_survivors: int) -> float:
    """Each worker's discrete Gaussian parameter so that ``min_survivors`` of them sum to ``z * clip_norm * scale``."""
    if min_survivors < 1:
        raise PrivacyError(f"min_survivors must be >= 1, got {min_survivors}")
    if not (noise_multiplier > 0 and clip_norm > 0 and scale > 0):
        raise PrivacyError(
            f"noise_multiplier, clip_norm and scale must be positive, got {noise_multiplier}, {clip_norm}, {scale}"
        )
    sigma = noise_multiplier * clip_norm * scale / math.sqrt(min_survivors)
    if sigma < 1:
        raise PrivacyError(
            f"each worker's noise would be {sigma:.3g} quantisation steps, too coarse for the discrete Gaussian sum "
            f"to be close to Gaussian: raise the quantisation scale ({scale:g}) to at least "
            f"{scale / sigma:.3g}"
        )
    return sigma


def add_discrete_noise(
    quantised: Mapping[str, torch.Tensor], *, noise: NoiseSource, server_round: int, sigma: float
) -> dict[str, torch.Tensor]:
    """Each integer tensor plus discrete Gaussian noise drawn for ``(round, name)``; dtypes are kept.

    Wrap-around in the secure-aggregation modulus is the caller's concern: choose the field so the noised sum fits.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in quantised.items():
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise PrivacyError(f"distributed DP noises quantised integer tensors; {name!r} is {tensor.dtype}")
        draw = noise.discrete_gaussian(server_round, DISTRIBUTED_PURPOSE, name, tensor.shape, sigma)
        out[name] = (tensor.to(torch.int64) + draw).to(tensor.dtype)
    return out


def discrete_noise_vector(noise: NoiseSource, *, server_round: int, length: int, sigma: float) -> np.ndarray:
    """``length`` int64 discrete Gaussian values for a flat quantised vector (secure aggregation's layout).

    Add them to the signed integer coordinates *before* wrapping modulo the field, with :func:`noise_headroom`
    counted in the field's overflow check.
    """
    if length < 0:
        raise PrivacyError(f"vector length must be >= 0, got {length}")
    values: np.ndarray = noise.discrete_gaussian(server_round, DISTRIBUTED_PURPOSE, "vector", (length,), sigma).numpy()
    return values


def noise_headroom(*, sigma: float, contributors: int, tail_sigmas: float = 12.0) -> int:
    """A bound on ``|sum of contributors' noise|`` in one coordinate, exceeded with probability below
    ``2 exp(-tail_sigmas**2 / 2)`` (discrete Gaussians are sub-Gaussian with parameter sigma, Canonne et al. 2020;
    1e-31 at 12): the room the field must keep beside ``contributors * levels``."""
    if contributors < 1 or not (sigma > 0) or not (tail_sigmas > 0):
        raise PrivacyError(f"need sigma > 0, contributors >= 1, tail_sigmas > 0; got {sigma}, {contributors}, {tail_sigmas}")
    return math.ceil(tail_sigmas * sigma * math.sqrt(contributors))
