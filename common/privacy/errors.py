"""Errors of differential privacy.

::

    FedlinkError
    └── PrivacyError                 (fedlink.privacy.errors)
        ├── BudgetExceeded           the next round would spend more epsilon than ``max_epsilon`` allows
        ├── AccountingUnsupported    the sampling scheme is one the chosen accountant cannot account for
        └── ModelNotPrivatizable     Opacus cannot compute per-example gradients for this model (BatchNorm...)
"""

from __future__ import annotations

from fedlink.errors import FedlinkError

__all__ = ["PrivacyError", "BudgetExceeded", "AccountingUnsupported", "ModelNotPrivatizable"]


class PrivacyError(FedlinkError):
    code = "privacy_error"


class BudgetExceeded(PrivacyError):
    """Raised before a round runs: the message names the round, the epsilon it would reach and the budget."""

    code = "privacy_budget_exceeded"


class AccountingUnsupported(PrivacyError):
    """The accountant's guarantee would be wrong for this sampling scheme, so nothing is accounted."""

    code = "privacy_accounting_unsupported"


class ModelNotPrivatizable(PrivacyError):
    """The model has layers without per-example gradients; the message lists them and what to use instead."""

    code = "privacy_model_unsupported"
