"""Differential privacy on the coordinator: the run's noise secret, its privacy ledger, cohorts and DP-FedAvg.

The pure pieces live in :mod:`fedlink.privacy`; this module wires them into a run (see README, Differential
privacy):

- :class:`RunPrivacy` holds what a run's privacy needs across rounds: the noise secret (made with ``secrets`` at
  the start of the run and kept only in the checkpoint folder, never in the config, logs, metrics or model), the
  ledger that steps once per released round, and the sampling rate and noise multiplier it accounts. It announces
  the round's privacy in every training plan (``TrainingPlan.privacy``), so a worker's policy can check it.
- :class:`CentralDPStrategy` wraps the configured strategy (FedAvg, FedAvgM, FedAdam...) for ``mode: central``
  (McMahan, Ramage, Talwar, Zhang, ICLR 2018): every update is clipped, the noised mean with a fixed denominator
  is released (:class:`fedlink.privacy.central.CentralDP`), and the wrapped strategy takes that mean as its one
  update, so server optimizers run on the private mean.
- :func:`poisson_select`: each worker independently with probability ``sampling.rate``, from coins keyed by the
  run's secret, so nobody holding the config can tell who took part (the amplification the ledger counts on).

A retried round (``timeouts.round_retries``) draws other noise and other coins: the attempt is in the label.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedlink.privacy import NoiseSource, PrivacyConfig, PrivacyLedger, accounting_sampling
from fedlink.privacy.central import CentralDP, DPFedAvgAggregation
from fedlink.privacy.distributed import noise_headroom
from fedlink.privacy.errors import PrivacyError
from fedlink.privacy.ledger import resolve_noise_multiplier
from fedlink.privacy.sampling import SAMPLING_PURPOSE
from fedlink.protocol.messages import PrivacyPlan, TrainingPlan
from fedlink.protocol.tensors import State

from .config import JobConfig
from .errors import ConfigError
from .strategy.base import Aggregate, Aggregation, ClientUpdate, RoundContext, Strategy, as_aggregate
from .strategy.updates import MeanAggregation
from .train_stage import derive_seed

__all__ = [
    "RunPrivacy",
    "CentralDPStrategy",
    "DistributedDPStrategy",
    "distributed_levels",
    "poisson_select",
    "pool_size",
    "SECRET_FILE",
]

#: In the checkpoint folder, written at the start of a run (mode 0600): the noise secret, so that a run killed
#: before its first checkpoint resumes with the same noise. Removed with the checkpoint folder by a fresh start.
SECRET_FILE = "privacy-secret.json"

W = TypeVar("W")


def pool_size(config: JobConfig) -> int | None:
    """How many workers the run draws from, when the config says (listed or simulated); None for dial-in pools."""
    if config.simulation is not None:
        return config.simulation.workers
    if config.listen is None:
        return len(config.workers)
    return None


def poisson_select(
    available: Sequence[W], names: Sequence[str], *, rate: float, server_round: int, attempt: int,
    noise: NoiseSource | None, seed: int,
) -> list[W]:
    """Each worker with probability ``rate``, independently, in the given order; may be empty.

    Coins come from the run's secret when there is one (a cohort nobody can predict from the config), else from the
    seed. The first attempt at a round uses :func:`fedlink.privacy.sampling.poisson_cohort`'s labels.
    """
    chosen: list[W] = []
    for worker, name in zip(available, names):
        if noise is not None:
            purpose = SAMPLING_PURPOSE if attempt == 0 else f"{SAMPLING_PURPOSE}/attempt-{attempt}"
            coin = float(noise.uniforms(server_round, purpose, name, 1)[0])
        else:
            coin = random.Random(derive_seed(seed, server_round, f"poisson/{attempt}/{name}")).random()
        if coin < rate:
            chosen.append(worker)
    return chosen


class RunPrivacy:
    """One run's differential privacy on the coordinator; see the module docstring."""

    def __init__(self, config: JobConfig) -> None:
        privacy = config.privacy
        if privacy is None:
            raise ValueError("RunPrivacy needs a privacy: section")
        self.config: PrivacyConfig = privacy
        self.mode = privacy.mode
        self.rounds = config.rounds
        self.sampling_mode = config.sampling.mode
        self.rate = config.sampling.rate
        self.attempt = 0
        self.noise: NoiseSource | None = None
        self.ledger: PrivacyLedger | None = None
        self.central: CentralDP | None = None
        self.noise_multiplier: float | None = privacy.fixed_noise_multiplier
        if self.mode == "local":
            return  # each worker keeps its own secret and accountant
        pool = pool_size(config)
        sampling = config.sampling
        if sampling.mode == "poisson":
            assert sampling.rate is not None
            rate = sampling.rate
            expected = rate * pool if pool is not None else None
        else:
            cohort = None if pool is None else min(pool, max(sampling.min_workers, math.ceil(sampling.fraction * pool)))
            rate = sampling.fraction if pool is None or cohort is None else cohort / pool
            expected = float(cohort) if cohort is not None else None
        if expected is None:
            raise ConfigError(
                f"privacy.mode {self.mode} divides the noised sum by the expected cohort, which needs the pool's size: "
                "list the workers (or use simulation.workers); a dial-in pool (listen) has no fixed size"
            )
        try:
            self.sampling, self.q = accounting_sampling(sampling.mode, rate)
            self.noise_multiplier = resolve_noise_multiplier(
                privacy, q=self.q, repetitions=config.rounds, sampling=self.sampling
            )
            self.ledger = PrivacyLedger(delta=privacy.delta, accountant=privacy.accountant, sampling=self.sampling)
        except PrivacyError as exc:
            raise ConfigError(f"privacy: {exc}") from exc
        self.noise = NoiseSource.create()
        self.expected_cohort = expected
        if self.mode == "central":
            try:
                self.central = CentralDP(
                    clip_norm=privacy.clip_norm, noise_multiplier=self.noise_multiplier, expected_cohort=expected,
                    noise=self.noise, adaptive=privacy.adaptive_clipping,
                )
            except PrivacyError as exc:
                raise ConfigError(f"privacy: {exc}") from exc

    # -- the plan, the cohort, the budget ---------------------------------------------------------------------

    def plan(self, plan: TrainingPlan) -> TrainingPlan:
        """``plan`` announcing this run's privacy (workers train with DP-SGD in local mode)."""
        c = self.config
        announced = PrivacyPlan(
            mode=c.mode, clip_norm=c.clip_norm,
            noise_multiplier=self.noise_multiplier if c.mode != "local" else c.noise_multiplier,
            target_epsilon=c.target_epsilon if c.mode == "local" else None,
            delta=c.delta, max_epsilon=c.max_epsilon if c.mode == "local" else None, accountant=c.accountant,
            rounds=self.rounds,
        )
        return plan.model_copy(update={"privacy": announced})

    def select(self, available: Sequence[W], names: Sequence[str], server_round: int, seed: int) -> list[W]:
        assert self.rate is not None
        return poisson_select(
            available, names, rate=self.rate, server_round=server_round, attempt=self.attempt, noise=self.noise, seed=seed
        )

    def check_budget(self, server_round: int) -> None:
        """Raise :class:`~fedlink.privacy.BudgetExceeded` before a round that would pass ``max_epsilon``."""
        if self.ledger is None or self.config.max_epsilon is None:
            return
        assert self.noise_multiplier is not None
        self.ledger.check_budget(server_round, self.config.max_epsilon, self.q, self.noise_multiplier)

    def step(self) -> dict[str, float]:
        """Account one released round; the metrics every record carries."""
        assert self.ledger is not None and self.noise_multiplier is not None
        epsilon = self.ledger.step(self.q, self.noise_multiplier)
        return {"epsilon": epsilon, "delta": self.ledger.delta}

    def local_record(self, worker_epsilons: Sequence[float], history: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Local mode: the largest epsilon any worker reported so far (this round's or an earlier record's)."""
        earlier = [float(r["epsilon"]) for r in history if isinstance(r.get("epsilon"), (int, float))]
        return {"epsilon": max([*earlier, *worker_epsilons], default=0.0), "delta": self.config.delta}

    # -- what survives a restart ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; holds the noise secret, so it goes into the checkpoint and nowhere else."""
        out: dict[str, Any] = {}
        if self.noise is not None:
            out["noise"] = self.noise.state_dict()
        if self.ledger is not None:
            out["ledger"] = self.ledger.state_dict()
        if self.central is not None:
            out["central"] = self.central.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if self.noise is not None:
                self._set_noise(NoiseSource.from_state_dict(state["noise"]))
            if self.ledger is not None:
                self.ledger.load_state_dict(state["ledger"])
            if self.central is not None:
                self.central.load_state_dict(state["central"])
        except KeyError as exc:
            raise ConfigError(f"the checkpoint has no privacy state {exc}: it was written by a run without it") from None
        except PrivacyError as exc:
            raise ConfigError(f"checkpointed privacy state: {exc}") from exc

    def _set_noise(self, noise: NoiseSource) -> None:
        self.noise = noise
        if self.central is not None:
            self.central.noise = noise

    def adopt_saved_secret(self, folder: Path) -> None:
        """On ``--resume``: take the secret this run saved at its start (a run killed before its first checkpoint)."""
        path = folder / SECRET_FILE
        if self.noise is None or not path.exists():
            return
        try:
            self._set_noise(NoiseSource.from_state_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, PrivacyError) as exc:
            raise ConfigError(f"{path} is unreadable, so the run cannot resume its noise: {exc}") from exc

    def save_secret(self, folder: Path) -> None:
        """Write the secret beside the checkpoints (0600, atomic), before the first round."""
        if self.noise is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (SECRET_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.noise.state_dict(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / SECRET_FILE)


class _CentralAggregation(Aggregation):
    """Folds clipped updates into DP-FedAvg's sum; at the end hands the noised mean to the wrapped strategy."""

    def __init__(self, dp: DPFedAvgAggregation, inner: Aggregation, privacy: RunPrivacy, global_state: State) -> None:
        self._dp = dp
        self._inner = inner
        self._privacy = privacy
        self._global = global_state

    def add(self, update: ClientUpdate) -> None:
        self._dp.add(update)

    def finish(self) -> Aggregate:
        delta = self._dp.finish_delta()
        release = self._dp.release
        assert release is not None
        metrics = self._privacy.step()
        # Integer buffers are not released (the clip does not cover them): the global model keeps its own.
        mean = {name: delta[name] if name in delta else value for name, value in self._global.items()}
        self._inner.add(ClientUpdate(worker="central-dp", kind="delta", num_samples=1, state=mean))
        result = as_aggregate(self._inner.finish())
        result.metrics.update(metrics)
        result.metrics.update(
            dp_updates=float(release.updates), dp_clip_norm=release.clip_norm,
            dp_noise_multiplier=float(self._privacy.noise_multiplier or 0.0),
        )
        if release.unclipped_fraction is not None:
            result.metrics["dp_unclipped_fraction"] = release.unclipped_fraction
        return result


class _PrivateStrategy(Strategy):
    """The configured strategy, wrapped: it plans and aggregates, and the run's privacy state (ledger, noise
    secret) is checkpointed beside its own state."""

    def __init__(self, inner: Strategy, privacy: RunPrivacy) -> None:
        self.inner = inner
        self.privacy = privacy

    @property
    def min_updates(self) -> int:
        return self.inner.min_updates

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        return self.inner.configure_train(server_round, plan)

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.inner.state_dict(), "privacy": self.privacy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"strategy", "privacy"}:
            raise ValueError(f"{self.name} strategy state needs keys strategy and privacy, got {sorted(state)}")
        self.inner.load_state_dict(state["strategy"])
        self.privacy.load_state_dict(state["privacy"])


class CentralDPStrategy(_PrivateStrategy):
    """``mode: central``: the configured strategy over DP-FedAvg's released mean (see the module docstring)."""

    name = "central_dp"

    def __init__(self, inner: Strategy, privacy: RunPrivacy, global_state: State) -> None:
        if privacy.central is None:
            raise ValueError("CentralDPStrategy needs privacy.mode central")
        probe = inner.begin_round(0, global_state)
        if not isinstance(probe, MeanAggregation):
            raise ConfigError(
                f"strategy {inner.name!r} does not aggregate by a mean of the updates, so it cannot run on DP-FedAvg's "
                "released mean (privacy.mode central); use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad"
            )
        super().__init__(inner, privacy)

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        raise NotImplementedError("central DP rounds start with start_round (the round's context)")

    def start_round(self, context: RoundContext, global_state: State) -> Aggregation:
        central = self.privacy.central
        assert central is not None
        dp = central.begin_round(context.server_round, global_state, self.privacy.attempt)
        return _CentralAggregation(dp, self.inner.start_round(context, global_state), self.privacy, global_state)


class DistributedDPStrategy(_PrivateStrategy):
    """``mode: distributed``: the configured strategy as it is (secure aggregation folds the noised sum into it),
    with the run's privacy state (ledger, secret for Poisson coins) in its checkpointed state."""

    name = "distributed_dp"

    def begin_round(self, server_round: int, global_state: State) -> Aggregation:
        return self.inner.begin_round(server_round, global_state)

    def start_round(self, context: RoundContext, global_state: State) -> Aggregation:
        return self.inner.start_round(context, global_state)


def distributed_levels(*, bits: int, contributors: int, noise_multiplier: float, min_survivors: int) -> int:
    """The finest quantisation ``levels`` whose noised sum cannot wrap modulo ``2^bits``.

    Each of ``contributors`` workers adds up to ``levels`` per coordinate plus discrete Gaussian noise of
    ``sigma = z * levels / sqrt(min_survivors)``; the field keeps :func:`~fedlink.privacy.distributed.noise_headroom`
    beside ``contributors * levels`` (Kairouz, Liu, Steinke, ICML 2021, section 4).
    """
    limit = (1 << (bits - 1)) - 1
    per_level = contributors + 12.0 * noise_multiplier * math.sqrt(contributors / min_survivors)
    levels = int(limit // per_level)
    while levels >= 1:
        sigma = noise_multiplier * levels / math.sqrt(min_survivors)
        if contributors * levels + noise_headroom(sigma=sigma, contributors=contributors) < limit:
            return levels
        levels -= 1
    raise ConfigError(
        f"secure_aggregation.bits = {bits} leaves no room for {contributors} workers' noised updates; raise bits"
    )
