from __future__ import annotations

import pytest

from fedlink.privacy import PrivacyError
from fedlink.privacy.noise import NoiseSource
from fedlink.privacy.sampling import poisson_cohort


def test_poisson_cohort_is_keyed_per_worker_and_round() -> None:
    source = NoiseSource(b"\x05" * 32)
    workers = [f"w{i:03d}" for i in range(2000)]
    cohort = poisson_cohort(source, 4, workers, 0.1)
    assert abs(len(cohort) - 200) < 4 * (2000 * 0.1 * 0.9) ** 0.5
    # a worker's coin does not depend on who else is connected or in which order
    assert poisson_cohort(source, 4, list(reversed(workers[:500])), 0.1) == [w for w in reversed(workers[:500]) if w in cohort]
    assert poisson_cohort(source, 5, workers, 0.1) != cohort
    assert poisson_cohort(NoiseSource(b"\x06" * 32), 4, workers, 0.1) != cohort


def test_rate_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(PrivacyError, match="sampling.rate"):
        poisson_cohort(NoiseSource(b"\x05" * 32), 1, ["a"], 0.0)
