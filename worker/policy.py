"""The worker operator's policy: what a coordinator holding the token may make leave the site.

The token says *who* may ask; the policy says *what* may be asked. A coordinator can otherwise read chosen
training samples exactly: with a linear model, ``batch_size: 1``, one step, ``update: delta`` and learning rate 1,
row ``k`` of the weight delta divided by the bias delta *is* the sample (Zhu et al., "Deep Leakage from
Gradients", NeurIPS 2019, and already Phong et al. 2017 for this analytic case). Each rule below is checked
before any of the training pipeline runs (no weights moved, no model built), and a refusal names the rule and
the flag that sets it (:class:`~.errors.PolicyRefused`, code ``policy_refused``), so the coordinator's operator
sees per worker why a round was refused.

What the defaults do *not* stop: gradient inversion of a batch of 16 still recovers recognisable images of small
models (Geiping et al., "Inverting Gradients", NeurIPS 2020), a coordinator that chooses malicious weights can
make single samples stand out of larger batches (Boenisch et al., "When the Curious Abandon Honesty", EuroS&P
2023), and differencing two rounds with the same seed isolates one step. Secure aggregation and differential
privacy (``require_secure_aggregation``, ``require_dp``) are the answers to those; see SECURITY.md.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedlink.factory import ModelAllowList
from fedlink.protocol.messages import EvaluateRequest, StageRequest, TrainingPlan, TrainRequest, UpdateKind

from .errors import PolicyRefused

DPMode = Literal["central", "local", "distributed"]

__all__ = [
    "WorkerPolicy",
    "PolicyGate",
    "PolicyFileError",
    "load_policy",
    "SECURE_AGGREGATION_HOOK",
    "DP_MODES",
    "FLAGS",
]

# The plan hook that rounds run with secure aggregation set; a worker started with --require-secure-aggregation
# refuses training plans that do not name it. Differential privacy is announced by the plan's ``privacy`` field
# (its mode), which --require-dp checks against the modes this worker accepts (--dp-mode).
SECURE_AGGREGATION_HOOK = "secure_aggregation"
DP_MODES: tuple[DPMode, ...] = ("central", "local", "distributed")

# policy key -> the fl-worker flag that sets it (named in every refusal).
FLAGS = {
    "min_batch_size": "--min-batch-size",
    "min_samples": "--min-samples",
    "allowed_updates": "--allow-update",
    "max_local_steps": "--max-local-steps",
    "max_requests_per_hour": "--max-requests-per-hour",
    "evaluate_models": "--evaluate-model",
    "require_secure_aggregation": "--require-secure-aggregation",
    "require_dp": "--require-dp",
    "dp_modes": "--dp-mode",
    "max_epsilon": "--max-epsilon",
}


class PolicyFileError(ValueError):
    """A policy file that cannot be read or does not validate; the message names the file and the key."""


class WorkerPolicy(BaseModel):
    """What this worker agrees to; every field is also an ``fl-worker`` flag (see :data:`FLAGS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_batch_size: int = Field(16, ge=1, description="fewest examples behind each optimizer step")
    min_samples: int = Field(16, ge=1, description="fewest examples a round's update may be computed from")
    allowed_updates: tuple[UpdateKind, ...] = Field(("weights", "delta", "gradients"), min_length=1)
    max_local_steps: int | None = Field(None, ge=1, description="most optimizer steps one request may ask for")
    max_requests_per_hour: int | None = Field(None, ge=1, description="train, evaluate and stage requests")
    evaluate_models: tuple[str, ...] | None = Field(
        None, description="factories (globs) that may be evaluated on the shard; None: those --allow-model allows"
    )
    require_secure_aggregation: bool = False
    require_dp: bool = False
    dp_modes: tuple[DPMode, ...] = Field(
        DP_MODES, min_length=1,
        description="with require_dp, the privacy modes accepted: central and distributed trust the coordinator "
        "(or the other workers) to add the noise; local adds it here",
    )
    max_epsilon: float | None = Field(
        None, gt=0, description="local DP: refuse a round that would take this worker's epsilon for the run above it"
    )


def _refuse(key: str, why: str) -> PolicyRefused:
    return PolicyRefused(f"policy {key} ({FLAGS[key]}) refused: {why}")


class PolicyGate:
    """A policy applied to one worker's shard, with the request log behind ``max_requests_per_hour``."""

    def __init__(self, policy: WorkerPolicy, *, num_samples: int, allow: ModelAllowList) -> None:
        self.policy = policy
        self.num_samples = num_samples
        self.evaluate_allow = allow if policy.evaluate_models is None else ModelAllowList(policy.evaluate_models)
        self._recent: deque[float] = deque()

    def check(self, request: TrainRequest | EvaluateRequest | StageRequest, *, now: float | None = None) -> None:
        """Raise :class:`PolicyRefused` unless this worker's policy admits ``request``; counts it if admitted."""
        if isinstance(request, TrainRequest):
            self.check_plan(request.plan)
        elif isinstance(request, EvaluateRequest):
            if not self.evaluate_allow.allows(request.model.factory):
                raise _refuse("evaluate_models", f"model {request.model.factory!r} may not be evaluated on this shard")
        self._count(time.monotonic() if now is None else now)

    def check_plan(self, plan: TrainingPlan, *, request_level: bool = True) -> None:
        """The training rules. ``request_level`` False (the local step itself, also reached from the secure
        aggregation stages, whose update never leaves alone) leaves out ``require_secure_aggregation``."""
        p, n = self.policy, self.num_samples
        if plan.update not in p.allowed_updates:
            raise _refuse("allowed_updates", f"update {plan.update!r} is not one of {', '.join(p.allowed_updates)}")
        hooks = {h.name for h in plan.hooks}
        if request_level and p.require_secure_aggregation and SECURE_AGGREGATION_HOOK not in hooks:
            raise _refuse(
                "require_secure_aggregation", "this update would leave the worker on its own, not under secure aggregation"
            )
        if p.require_dp:
            if plan.privacy is None:
                raise _refuse("require_dp", "the round does not use differential privacy")
            if plan.privacy.mode not in p.dp_modes:
                raise _refuse(
                    "dp_modes", f"the round uses {plan.privacy.mode} differential privacy; this worker accepts "
                    f"{', '.join(p.dp_modes)}",
                )
        if plan.update == "gradients":  # one gradient over the whole shard
            per_step, steps = n, 1
            samples = n
        else:
            per_step = min(plan.batch_size, n)
            steps = plan.epochs * math.ceil(n / max(plan.batch_size, 1))
            if plan.max_steps is not None:
                steps = min(steps, plan.max_steps)
            samples = min(n, steps * per_step)
        if per_step < p.min_batch_size:
            raise _refuse(
                "min_batch_size", f"{per_step} examples per step (batch_size {plan.batch_size}, shard of {n}); "
                f"this worker needs at least {p.min_batch_size}",
            )
        if samples < p.min_samples:
            raise _refuse(
                "min_samples", f"the update would come from {samples} examples; this worker needs at least {p.min_samples}"
            )
        if p.max_local_steps is not None and steps > p.max_local_steps:
            raise _refuse("max_local_steps", f"{steps} local steps asked for; this worker takes at most {p.max_local_steps}")

    def _count(self, now: float) -> None:
        limit = self.policy.max_requests_per_hour
        if limit is None:
            return
        while self._recent and now - self._recent[0] >= 3600:
            self._recent.popleft()
        if len(self._recent) >= limit:
            raise _refuse("max_requests_per_hour", f"{len(self._recent)} requests in the last hour; the limit is {limit}")
        self._recent.append(now)


def load_policy(path: Path | None, overrides: dict[str, Any]) -> WorkerPolicy:
    """The policy of ``path`` (YAML, keys as :class:`WorkerPolicy`) with ``overrides`` (flags given) on top."""
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "fl-worker flags"
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PolicyFileError(f"cannot read policy file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise PolicyFileError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise PolicyFileError(f"{path}: expected a mapping of policy keys ({', '.join(FLAGS)})")
        data = dict(loaded or {})
    data.update(overrides)
    try:
        return WorkerPolicy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error.get("loc", ())) or "(top level)"
            message = "unknown key" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")
            problems.append(f"  {key} = {error.get('input')!r}: {message}")
        raise PolicyFileError(f"{source}: invalid worker policy\n" + "\n".join(problems)) from None
