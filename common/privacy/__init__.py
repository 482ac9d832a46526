"""Differential privacy: configuration, the privacy ledger, CSPRNG-keyed noise, DP-FedAvg and local DP-SGD.

Pure code only (no I/O, no network): the coordinator and the worker wire these pieces into rounds.

- :mod:`.config`: the ``privacy:`` section; :mod:`.ledger`: epsilon per released round (Opacus accountants, and
  :mod:`.subsampling` for fixed-size cohorts);
- :mod:`.noise`: Gaussian and discrete Gaussian noise keyed by a run secret (ChaCha20); :mod:`.sampling`: Poisson
  cohorts keyed by the same secret;
- :mod:`.central`: DP-FedAvg aggregation with adaptive clipping; :mod:`.distributed`: workers' noise under
  secure aggregation; :mod:`.local`: DP-SGD on a worker with Opacus and the worker's own budget.
"""

from __future__ import annotations

from .config import AdaptiveClippingConfig, PrivacyConfig
from .errors import AccountingUnsupported, BudgetExceeded, ModelNotPrivatizable, PrivacyError
from .ledger import (
    PrivacyLedger,
    Sampling,
    accounting_sampling,
    compute_epsilon,
    resolve_noise_multiplier,
    solve_noise_multiplier,
)
from .noise import NoiseSource

__all__ = [
    "PrivacyConfig",
    "AdaptiveClippingConfig",
    "PrivacyError",
    "BudgetExceeded",
    "AccountingUnsupported",
    "ModelNotPrivatizable",
    "PrivacyLedger",
    "accounting_sampling",
    "Sampling",
    "compute_epsilon",
    "solve_noise_multiplier",
    "resolve_noise_multiplier",
    "NoiseSource",
]
