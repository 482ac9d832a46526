"""Poisson sampling of a round's cohort, keyed by the run's secret so that who took part stays hidden.

Amplification by sampling (the ``q`` in the ledger) assumes the adversary does not know whether a given worker was
in a round. A cohort drawn from the config's seed would be known to anyone holding the config, so the privacy
accounting would have to drop the amplification. Instead each worker's coin comes from the run's
:class:`~fedlink.privacy.noise.NoiseSource`, labelled by round and worker id: the same worker in the same round
always gets the same coin (a resumed run picks the same cohorts), whoever else is connected and in whatever order.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import PrivacyError
from .noise import NoiseSource

__all__ = ["poisson_cohort", "SAMPLING_PURPOSE"]

SAMPLING_PURPOSE = "sampling/poisson"


def poisson_cohort(noise: NoiseSource, server_round: int, workers: Iterable[str], rate: float) -> list[str]:
    """The workers (in the order given) whose coin for ``server_round`` falls under ``rate``; may be empty."""
    if not (0 < rate <= 1):
        raise PrivacyError(f"sampling.rate must be in (0, 1], got {rate}")
    return [w for w in workers if float(noise.uniforms(server_round, SAMPLING_PURPOSE, w, 1)[0]) < rate]
