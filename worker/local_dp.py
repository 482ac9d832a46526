"""Local differential privacy on a worker: DP-SGD in place of the normal training loop, with the worker's own budget.

A round whose plan says ``privacy.mode: local`` (:class:`fedlink.protocol.messages.PrivacyPlan`) is trained by
:func:`fedlink.privacy.local.train_dp_sgd` (Abadi et al., CCS 2016, with Opacus): Poisson batches and Gaussian
noise from this worker's own secret, per-example clipping to ``clip_norm``. The worker keeps one accountant per
run in its per-run store (:class:`fedlink.privacy.local.LocalAccountants`, in memory: lost on restart), reports
the epsilon it has spent for the run in its metrics, and refuses a round that would take it past its budget: its
operator's ``--max-epsilon`` (a policy refusal, code ``policy_refused``) or the coordinator's
``privacy.max_epsilon``. Models without per-example gradients (BatchNorm) are refused with the reason.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from fedlink.privacy import BudgetExceeded, PrivacyError
from fedlink.privacy.ledger import solve_noise_multiplier
from fedlink.privacy.local import LocalAccountants, check_privatizable, dp_sgd_steps, train_dp_sgd
from fedlink.protocol.messages import TrainingPlan
from fedlink.training import Metrics, TrainingCancelled

from .errors import BadRequest, PolicyRefused

__all__ = ["train_private", "RUN_STATE_KEY"]

#: Where the accountants live in the worker's per-run store.
RUN_STATE_KEY = "privacy.local"


def _accountants(run_state: dict[str, object], accountant: str) -> LocalAccountants:
    found = run_state.get(RUN_STATE_KEY)
    if not isinstance(found, LocalAccountants):
        found = LocalAccountants(accountant="prv" if accountant == "prv" else "rdp")
        run_state[RUN_STATE_KEY] = found
    return found


def _noise_multiplier(plan: TrainingPlan, q: float, steps: int, run_state: dict[str, object]) -> float:
    """The plan's multiplier, or the one that spends ``target_epsilon`` over the planned rounds (solved once)."""
    privacy = plan.privacy
    assert privacy is not None
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    if privacy.target_epsilon is None:
        return 1.0
    key = f"privacy.local.z/{privacy.target_epsilon}/{q}/{steps}/{privacy.rounds}/{privacy.delta}/{privacy.accountant}"
    cached = run_state.get(key)
    if isinstance(cached, float):
        return cached
    z = solve_noise_multiplier(
        privacy.target_epsilon, q, steps * privacy.rounds, privacy.delta,
        accountant="prv" if privacy.accountant == "prv" else "rdp",
    )
    run_state[key] = z
    return z


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: TrainingPlan,
    *,
    run_id: str,
    server_round: int,
    run_state: dict[str, object],
    max_epsilon: float | None,
    stop: threading.Event | None,
) -> tuple[Metrics, dict[str, float]]:
    """Train ``model`` in place with DP-SGD; returns the metrics and the privacy figures to report (epsilon...)."""
    privacy = plan.privacy
    assert privacy is not None and privacy.mode == "local"
    if plan.hooks:
        raise BadRequest(
            "local DP trains with DP-SGD, which runs no training hooks; the plan names "
            + ", ".join(h.name for h in plan.hooks)
        )
    if plan.update == "gradients":
        raise BadRequest("local DP trains with DP-SGD: the plan must ask for update weights or delta")
    check_privatizable(model)  # ModelNotPrivatizable names the layers and the fix
    accountants = _accountants(run_state, privacy.accountant)
    try:
        q, steps = dp_sgd_steps(len(x), plan.batch_size, plan.epochs)
        z = _noise_multiplier(plan, q, steps, run_state)
        ledger = accountants.ledger(run_id, privacy.delta)
        after = ledger.epsilon_after(q, z, steps)
    except PrivacyError as exc:
        raise BadRequest(str(exc)) from exc
    if max_epsilon is not None and after > max_epsilon:
        raise PolicyRefused(
            f"policy max_epsilon (--max-epsilon) refused: round {server_round} would raise this worker's epsilon for "
            f"the run from {ledger.epsilon:.4g} to {after:.4g} (delta {privacy.delta:g}), above its budget "
            f"{max_epsilon:g}"
        )
    if privacy.max_epsilon is not None and after > privacy.max_epsilon:
        raise BudgetExceeded(
            f"round {server_round} would raise this worker's epsilon from {ledger.epsilon:.4g} to {after:.4g} "
            f"(delta {privacy.delta:g}), above the job's privacy.max_epsilon {privacy.max_epsilon:g}"
        )
    opt = plan.optimizer
    result = train_dp_sgd(
        model, x, y, batch_size=plan.batch_size, epochs=plan.epochs, optimizer=opt.name, lr=opt.lr,
        momentum=opt.momentum, weight_decay=opt.weight_decay, clip_norm=privacy.clip_norm, noise_multiplier=z,
        noise=accountants.noise(run_id), server_round=server_round, ledger=ledger,
        stop=stop.is_set if stop is not None else None,
    )
    if stop is not None and stop.is_set():
        raise TrainingCancelled("training stopped: the worker is shutting down")
    metrics = Metrics(loss=result.loss, accuracy=result.accuracy, num_samples=len(x), steps=result.steps)
    return metrics, {
        "epsilon": result.epsilon, "delta": privacy.delta, "noise_multiplier": z, "sample_rate": result.sample_rate,
    }
