"""Rényi DP of the Gaussian mechanism on a fixed-size cohort (sampling without replacement).

Wang, Balle, Kasiviswanathan, "Subsampled Rényi Differential Privacy and Analytical Moments Accountant",
AISTATS 2019, Theorem 9: if a mechanism is ``eps(j)``-RDP for every integer order ``j`` under the *replace-one*
relation (a worker's data swapped for someone else's; the pool size is public), running it on a uniformly random
subset of ``m`` out of ``n`` (``gamma = m / n``) is ``eps'(alpha)``-RDP with, for integer ``alpha >= 2``::

    eps'(alpha) <= 1/(alpha-1) * log(1 + gamma**2 * C(alpha, 2) * min(4 (e**eps(2) - 1), 2 e**eps(2))
                                       + sum_{j=3..alpha} 2 gamma**j C(alpha, j) e**((j-1) eps(j)))

(the theorem's ``min(2, (e**eps(inf) - 1)**j)`` factors are 2 for the Gaussian, whose ``eps(inf)`` is infinite).
The Gaussian mechanism with noise ``sigma`` and replace-one sensitivity ``S`` has ``eps(j) = j S**2 / (2 sigma**2)``.
For a sum of updates clipped to ``C`` a swap moves the sum by up to ``2 C``, so the multiplier ``z = sigma / C`` of
the add/remove setting becomes ``z / 2`` here: the same noise buys a weaker guarantee, stated for a swap.

This is the theorem's general bound, not the paper's tighter Gaussian-specific one (its Theorem 27); it is an
upper bound either way. Orders are the integers 2..256, computed in log space.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, logsumexp

__all__ = ["FIXED_COHORT_ORDERS", "fixed_cohort_rdp"]

FIXED_COHORT_ORDERS: list[float] = [float(a) for a in range(2, 257)]


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    result: np.ndarray = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return result


def fixed_cohort_rdp(gamma: float, noise_multiplier: float) -> np.ndarray:
    """One round's RDP at :data:`FIXED_COHORT_ORDERS`; ``noise_multiplier`` = noise std / clip of one update."""
    if not (0 < gamma <= 1):
        raise ValueError(f"cohort fraction must be in (0, 1], got {gamma}")
    sigma = noise_multiplier / 2  # noise over the replace-one sensitivity 2 C

    def eps(order: np.ndarray | float) -> np.ndarray | float:
        return order / (2 * sigma**2)

    if gamma == 1:
        return np.asarray([eps(a) for a in FIXED_COHORT_ORDERS], dtype=np.float64)
    eps2 = float(eps(2.0))
    log_expm1_eps2 = eps2 + math.log1p(-math.exp(-eps2))
    second = 2 * math.log(gamma) + min(math.log(4) + log_expm1_eps2, math.log(2) + eps2)
    log_gamma = math.log(gamma)
    out = np.empty(len(FIXED_COHORT_ORDERS))
    for index, order in enumerate(FIXED_COHORT_ORDERS):
        alpha = int(order)
        j = np.arange(3, alpha + 1, dtype=np.float64)
        terms = [0.0, second + float(_log_comb(alpha, np.asarray(2.0)))]
        if alpha >= 3:
            higher = math.log(2) + j * log_gamma + _log_comb(alpha, j) + (j - 1) * eps(j)
            terms.extend(higher.tolist())
        out[index] = float(logsumexp(terms)) / (alpha - 1)
    return out
