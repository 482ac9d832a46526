"""The privacy ledger: epsilon spent so far, one accountant step per released round.

User-level DP for federated rounds (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018): a round is one application of the sampled Gaussian mechanism to the sum of clipped
updates, with sampling rate ``q`` and noise multiplier ``z`` on the sum.

- ``sampling="poisson"`` (each worker takes part independently with probability ``q``; neighbouring runs differ by
  one worker's presence): Opacus's arithmetic, Rényi DP of the sampled Gaussian (Mironov, Talwar, Zhang 2019) or
  the PRV accountant (Gopi, Lee, Wutschitz, NeurIPS 2021).
- ``sampling="fixed"`` (a uniformly random cohort of fixed size, ``q = cohort / pool``; neighbouring runs differ by
  one worker's data swapped for another's): the sampling-without-replacement bound of :mod:`.subsampling`, RDP
  only. The PRV accountant cannot account for it and is refused (:class:`AccountingUnsupported`).

Both convert RDP to (epsilon, delta) with Opacus's ``get_privacy_spent``. The history is plain numbers,
``[[z, q, rounds], ...]``, so a checkpoint stores it as JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from .config import AccountantName, PrivacyConfig
from .errors import AccountingUnsupported, BudgetExceeded, PrivacyError
from .subsampling import FIXED_COHORT_ORDERS, fixed_cohort_rdp

__all__ = [
    "Sampling",
    "PrivacyLedger",
    "solve_noise_multiplier",
    "resolve_noise_multiplier",
    "accounting_sampling",
    "compute_epsilon",
]

Sampling = Literal["poisson", "fixed"]
_ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
History = list[tuple[float, float, int]]


def _check_step(q: float, z: float) -> None:
    if not (0 < q <= 1):
        raise PrivacyError(f"sampling rate q must be in (0, 1], got {q}")
    if not (z > 0 and math.isfinite(z)):
        raise PrivacyError(f"noise multiplier z must be positive and finite, got {z}")


def _check_pair(accountant: str, sampling: str) -> None:
    if accountant not in _ACCOUNTANTS:
        raise PrivacyError(f"privacy.accountant must be one of {sorted(_ACCOUNTANTS)}, got {accountant!r}")
    if sampling not in ("poisson", "fixed"):
        raise PrivacyError(f"sampling for accounting must be poisson or fixed, got {sampling!r}")
    if sampling == "fixed" and accountant != "rdp":
        raise AccountingUnsupported(
            f"privacy.accountant {accountant!r} only bounds Poisson sampling, and this run draws fixed-size cohorts: "
            "use privacy.accountant: rdp (sampling without replacement) or sampling: {mode: poisson, rate: q}"
        )


@lru_cache(maxsize=256)
def _unit_rdp(z: float, q: float, sampling: Sampling) -> np.ndarray:
    """Rényi DP of one round; composition multiplies it by the rounds. Computed once per ``(z, q)`` and process
    (Opacus's accountant recomputes it on every call, a second a round late in a long run)."""
    if sampling == "fixed":
        return fixed_cohort_rdp(q, z)
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    return np.asarray(rdp, dtype=np.float64)


def compute_epsilon(
    history: History, delta: float, accountant: AccountantName = "rdp", sampling: Sampling = "poisson"
) -> float:
    """Epsilon at ``delta`` after the mechanisms in ``history`` (``(z, q, repetitions)`` each); 0 when empty."""
    _check_pair(accountant, sampling)
    if not history:
        return 0.0
    if accountant == "prv":
        engine = _ACCOUNTANTS[accountant]()
        engine.history = [(float(z), float(q), int(n)) for z, q, n in history]
        return float(engine.get_epsilon(delta=delta))
    orders = FIXED_COHORT_ORDERS if sampling == "fixed" else RDPAccountant.DEFAULT_ALPHAS
    total = sum(_unit_rdp(float(z), float(q), sampling) * int(n) for z, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": still a valid (looser) bound
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def accounting_sampling(mode: Literal["poisson", "fixed"], rate: float) -> tuple[Sampling, float]:
    """How to account a cohort drawn with ``sampling.mode`` at ``rate`` (Poisson rate, or cohort / pool).

    Every worker every round (fixed with rate 1) is accounted as Poisson with ``q = 1``: no sampling, and the
    add/remove relation, whose bound is the tighter of the two.
    """
    if not (0 < rate <= 1):
        raise PrivacyError(f"sampling rate must be in (0, 1], got {rate}")
    if mode == "poisson" or rate == 1:
        return "poisson", rate
    return "fixed", rate


class PrivacyLedger:
    """Epsilon spent by a run; :meth:`step` once per released round, never for a round that released nothing."""

    def __init__(self, *, delta: float, accountant: AccountantName = "rdp", sampling: Sampling = "poisson") -> None:
        _check_pair(accountant, sampling)
        if not (0 < delta < 1):
            raise PrivacyError(f"privacy.delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.accountant: AccountantName = accountant
        self.sampling: Sampling = sampling
        self._history: History = []
        self._epsilon = 0.0

    @property
    def rounds(self) -> int:
        """Rounds released (and accounted) so far."""
        return sum(n for _, _, n in self._history)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta`."""
        return self._epsilon

    def epsilon_at(self, delta: float) -> float:
        return compute_epsilon(self._history, delta, self.accountant, self.sampling)

    def epsilon_after(self, q: float, z: float, rounds: int = 1) -> float:
        """Epsilon if ``rounds`` more rounds with ``(q, z)`` were released; nothing is recorded."""
        _check_step(q, z)
        return compute_epsilon(_appended(self._history, z, q, rounds), self.delta, self.accountant, self.sampling)

    def would_exceed(self, max_epsilon: float, q: float, z: float) -> bool:
        """True when releasing one more round with ``(q, z)`` would take epsilon above ``max_epsilon``."""
        return self.epsilon_after(q, z) > max_epsilon

    def check_budget(self, server_round: int, max_epsilon: float | None, q: float, z: float) -> None:
        """Raise :class:`BudgetExceeded` before ``server_round`` runs if releasing it would pass ``max_epsilon``."""
        if max_epsilon is None:
            return
        after = self.epsilon_after(q, z)
        if after > max_epsilon:
            raise BudgetExceeded(
                f"round {server_round} would raise epsilon from {self._epsilon:.4g} to {after:.4g} "
                f"(delta {self.delta:g}), above privacy.max_epsilon {max_epsilon:g}; the run stops here with "
                f"{self.rounds} round(s) released"
            )

    def step(self, q: float, z: float, rounds: int = 1) -> float:
        """Record ``rounds`` released rounds (or DP-SGD steps) with rate ``q`` and multiplier ``z``; the new epsilon."""
        _check_step(q, z)
        if rounds < 1:
            raise PrivacyError(f"rounds to record must be >= 1, got {rounds}")
        self._history = _appended(self._history, z, q, rounds)
        self._epsilon = compute_epsilon(self._history, self.delta, self.accountant, self.sampling)
        return self._epsilon

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: accountant, sampling, delta and the run-length encoded ``[[z, q, rounds], ...]``."""
        return {
            "accountant": self.accountant,
            "sampling": self.sampling,
            "delta": self.delta,
            "history": [[z, q, n] for z, q, n in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = (state.get("accountant"), state.get("sampling"), state.get("delta"))
        if saved != (self.accountant, self.sampling, self.delta):
            raise PrivacyError(
                f"checkpointed privacy ledger has (accountant, sampling, delta) {saved}, this run "
                f"{(self.accountant, self.sampling, self.delta)}: resume with the same privacy.accountant, "
                "sampling.mode and privacy.delta"
            )
        history: History = []
        for entry in state.get("history", []):
            try:
                z, q, n = entry
                z, q, n = float(z), float(q), int(n)
            except (TypeError, ValueError):
                raise PrivacyError(f"checkpointed privacy history entry {entry!r} is not [z, q, rounds]") from None
            _check_step(q, z)
            if n < 1:
                raise PrivacyError(f"checkpointed privacy history entry {entry!r} has no rounds")
            history.append((z, q, n))
        self._history = history
        self._epsilon = compute_epsilon(history, self.delta, self.accountant, self.sampling)


def _appended(history: History, z: float, q: float, rounds: int) -> History:
    if history and history[-1][0] == z and history[-1][1] == q:
        return [*history[:-1], (z, q, history[-1][2] + rounds)]
    return [*history, (z, q, rounds)]


def solve_noise_multiplier(
    target_epsilon: float,
    q: float,
    rounds: int,
    delta: float,
    *,
    accountant: AccountantName = "rdp",
    sampling: Sampling = "poisson",
    tolerance: float = 0.005,
) -> float:
    """The smallest-found ``z`` whose epsilon after ``rounds`` lies in ``[target * (1 - tolerance), target]``.

    Bisection on ``z`` (epsilon decreases as ``z`` grows); the answer never overshoots the target.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"privacy.target_epsilon must be positive, got {target_epsilon}")
    if rounds < 1:
        raise PrivacyError(f"planned rounds must be >= 1 to solve for a noise multiplier, got {rounds}")
    _check_step(q, 1.0)
    _check_pair(accountant, sampling)

    def eps(z: float) -> float:
        return compute_epsilon([(z, q, rounds)], delta, accountant, sampling)

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyError(f"privacy.target_epsilon {target_epsilon} needs a noise multiplier above 1e4")
        eps_high = eps(high)
    for _ in range(200):
        if eps_high >= target_epsilon * (1 - tolerance):
            return high
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    raise PrivacyError(f"no noise multiplier found within {tolerance:.1%} of target_epsilon {target_epsilon}")


def resolve_noise_multiplier(
    config: PrivacyConfig, *, q: float, repetitions: int, sampling: Sampling = "poisson"
) -> float:
    """The multiplier a run uses: the configured one, or the one solved for ``target_epsilon``.

    ``repetitions``: planned rounds (central, distributed: the coordinator's ``rounds``), or planned DP-SGD steps
    over the whole run (local: rounds x steps per round, which only the worker knows).
    """
    fixed = config.fixed_noise_multiplier
    if fixed is not None:
        return fixed
    assert config.target_epsilon is not None
    return solve_noise_multiplier(
        config.target_epsilon, q, repetitions, config.delta, accountant=config.accountant, sampling=sampling
    )
