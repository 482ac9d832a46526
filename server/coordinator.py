"""A training job from start to end: connect the workers, run the rounds, evaluate, write the results."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import tempfile
import time
from typing import Any

import torch

from fedlink.factory import ModelAllowList, build_model
from fedlink.privacy import BudgetExceeded
from fedlink.protocol.messages import Hello, HookSpec, TrainingPlan
from fedlink.protocol.session import SessionOptions
from fedlink.protocol.spill import Spill, memory_backed
from fedlink.protocol.tensors import State, StateHeader, header_of
from fedlink.shards import load_shard
from fedlink.training import Metrics, evaluate

from . import __version__
from .config import JobConfig
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .aggregate import non_finite
from .errors import ConfigError, NotEnoughWorkers, RoundRefused
from .output import RunOutput
from .pool import WorkerPool
from .progress import Progress
from .remote import RemoteWorker
from .engine import run_stage
from .evaluate_stage import EvaluateStage, weighted_evaluation
from .secure_rounds import SecureRound
from .privacy import CentralDPStrategy, DistributedDPStrategy, RunPrivacy
from .rounds import RoundReport, derive_seed, run_round
from .transfer import TransferFormat, upload_slots
from .security import Security
from .strategy import Strategy, build_strategy

__all__ = ["Coordinator", "select_workers", "initial_state"]

log = logging.getLogger("fedlink.server")

# The coordinator runs the operator's own config, so it may build any factory it names.
_TRUST_CONFIG = ModelAllowList(("*",))


def select_workers(
    available: list[RemoteWorker], *, fraction: float, min_workers: int, seed: int, server_round: int,
    purpose: str = "sampling",
) -> list[RemoteWorker]:
    """A seeded sample of ``ceil(fraction * n)`` (at least ``min_workers``) workers, in configured order."""
    count = min(len(available), max(min_workers, math.ceil(fraction * len(available))))
    if count >= len(available):
        return list(available)
    rng = random.Random(derive_seed(seed, server_round, purpose))
    chosen = set(rng.sample(range(len(available)), count))
    return [w for i, w in enumerate(available) if i in chosen]


def initial_state(config: JobConfig) -> tuple[State, StateHeader]:
    """The seeded initial global state, and the header of the model's parameters (what gradients cover).

    The module itself is dropped: the coordinator holds the model once, as plain tensors.
    """
    torch.manual_seed(config.seed)
    model = build_model(config.model.factory, config.model.kwargs, _TRUST_CONFIG)
    return {k: v.detach() for k, v in model.state_dict().items()}, header_of(dict(model.named_parameters()))


def frozen_parameters(config: JobConfig) -> frozenset[str]:
    """The model's parameters that training leaves alone (``requires_grad=False``), found on the meta device."""
    try:
        with torch.device("meta"):
            model = build_model(config.model.factory, config.model.kwargs, _TRUST_CONFIG)
    except Exception:  # noqa: BLE001 - some factories cannot build on the meta device; build for real then
        model = build_model(config.model.factory, config.model.kwargs, _TRUST_CONFIG)
    return frozenset(name for name, p in model.named_parameters() if not p.requires_grad)


class Coordinator:
    def __init__(
        self,
        config: JobConfig,
        *,
        progress: Progress | None = None,
        workers: list[RemoteWorker] | None = None,
        options: SessionOptions | None = None,
    ) -> None:
        self.config = config
        self.progress = progress or Progress()
        self.security = Security.from_config(config)  # reads every token and certificate now, or fails
        self.workers = workers if workers is not None else [
            RemoteWorker(w.url, keyring=self.security.keyring_for(w), ssl_context=self.security.ssl_for(w))
            for w in config.workers
        ]
        self.options = options or SessionOptions(
            inbound_slots=1, heartbeat_interval=config.timeouts.heartbeat, heartbeat_timeout=6 * config.timeouts.heartbeat
        )
        self.pool = WorkerPool(
            self.workers,
            hello=self._hello(),
            limits=config.limits,
            options=self.options,
            connect_timeout=config.timeouts.connect,
            backoff_cap=config.timeouts.reconnect_max,
            listen_keyring=self.security.listen_keyring,
            listen_ssl=self.security.listen_ssl,
            max_connections=config.listen.max_connections if config.listen is not None else 1024,
            observer=self.progress,
        )
        self.output = RunOutput(config.output)
        spill_dir = config.limits.spill_dir
        if spill_dir is not None and not (os.path.isdir(spill_dir) and os.access(spill_dir, os.W_OK | os.X_OK)):
            raise ConfigError(f"limits.spill_dir {spill_dir!r} is not a directory this process can write to")
        self.state, self._param_header = initial_state(config)
        if header_of(self.state).nbytes >= config.limits.spill_bytes and memory_backed(spill_dir):
            log.warning(
                "limits.spill_dir (%s) is in memory (tmpfs): updates spilled there take memory, not disk; "
                "set limits.spill_dir to a directory on disk", spill_dir or tempfile.gettempdir(),
            )
        self.strategy: Strategy = build_strategy(config.strategy.name, config.strategy.params())
        if config.sampling.min_workers < self.strategy.min_updates:
            raise ConfigError(
                f"sampling.min_workers is {config.sampling.min_workers} but strategy {config.strategy.name!r} "
                f"needs at least {self.strategy.min_updates} updates per round"
            )
        # Differential privacy (README, Differential privacy): the run's secret, ledger and DP-FedAvg wrapper.
        self.privacy: RunPrivacy | None = RunPrivacy(config) if config.privacy is not None else None
        if self.privacy is not None and self.privacy.central is not None:
            self.strategy = CentralDPStrategy(self.strategy, self.privacy, self.state)
        elif self.privacy is not None and self.privacy.mode == "distributed":
            self.strategy = DistributedDPStrategy(self.strategy, self.privacy)
        #: Why the run ended before its last round (the privacy budget), or None.
        self.stopped: str | None = None
        self.strategy.configure_train(1, self._plan())  # refuses now what a round would refuse later
        self.secure: SecureRound | None = None
        if config.secure_aggregation is not None:
            self.secure = SecureRound(config.secure_aggregation, self.strategy)
            self.secure.privacy = self.privacy  # distributed DP: levels with room for the noise, ledger, denominator
            self.secure.check(self.state)
        # training.compression and training.download, granted per worker by what its hello offers (.transfer).
        self.transfer = TransferFormat(
            compression=config.training.compression, download=config.training.download,
            upload=config.training.upload, frozen=frozen_parameters(config),
            send_only_changed=config.training.send_only_changed,
        )
        self.transfer.versions.start(self.state)
        # Keys the workers' per-run stores; stable across --resume, different for another job or seed.
        self.run_id = hashlib.sha256(f"{config.name}\0{config.fingerprint()}".encode()).hexdigest()[:16]
        self.history: list[dict[str, Any]] = []
        self.listen_url: str | None = None
        self.listening = asyncio.Event()
        self._eval_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_model: torch.nn.Module | None = None
        if config.evaluation.data is not None:
            self._eval_data = load_shard(config.evaluation.data).to_tensors()
            self._eval_model = build_model(config.model.factory, config.model.kwargs, _TRUST_CONFIG).to(config.device)

    def _hello(self) -> Hello:
        return Hello(
            role="coordinator",
            peer_id=self.config.name,
            software=f"fedlink {__version__}",
            heartbeat=self.config.timeouts.heartbeat,
        )

    def _plan(self, server_round: int = 1) -> TrainingPlan:
        """The round's training plan; the learning rate decays by ``training.lr_decay`` per round."""
        t = self.config.training
        lr = t.optimizer.lr * t.lr_decay ** (server_round - 1)
        plan = TrainingPlan(
            epochs=t.epochs,
            batch_size=t.batch_size,
            optimizer=t.optimizer.model_copy(update={"lr": lr}),
            update=t.update,
            max_steps=t.max_steps,
        )
        if t.grad_clip is not None:
            plan = plan.with_hook(HookSpec(name="grad_clip", params={"max_norm": t.grad_clip}))
        if self.privacy is not None:
            plan = self.privacy.plan(plan)
        return plan

    def _evaluate(self, state: State) -> Metrics:
        assert self._eval_model is not None and self._eval_data is not None
        self._eval_model.load_state_dict(state)
        return evaluate(self._eval_model, *self._eval_data, batch_size=self.config.evaluation.batch_size, device=self.config.device)

    def _resume(self) -> int:
        """Load the last checkpoint; returns the first round still to run."""
        checkpoint = load_checkpoint(self.output.checkpoint_dir)
        if checkpoint is None:
            log.warning("no checkpoint in %s: starting from round 1", self.output.checkpoint_dir)
            self.output.start()
            return 1
        if checkpoint.fingerprint != self.config.fingerprint():
            raise ConfigError(
                f"checkpoint in {self.output.checkpoint_dir} was written by a job with another seed, model, "
                "training, strategy or sampling; resume with the original config or use a new output folder"
            )
        self.state = {name: checkpoint.state[name] for name in self.state}
        self.transfer.versions.start(self.state)
        self.strategy.load_state_dict(checkpoint.strategy)
        self.history = checkpoint.history
        self.output.restore(self.history)
        log.info("resuming after round %d", checkpoint.server_round)
        return checkpoint.server_round + 1

    async def run(self, *, resume: bool = False) -> list[dict[str, Any]]:
        """Run the job (from the last checkpoint with ``resume``); returns one record per round."""
        if getattr(self.strategy, "asynchronous", False):
            from .buffered import run_buffered

            return await run_buffered(self, resume=resume)
        config = self.config
        if resume and self.privacy is not None:
            self.privacy.adopt_saved_secret(self.output.checkpoint_dir)
        first_round = self._resume() if resume else 1
        if not resume:
            self.output.start()
        if self.privacy is not None:
            self.privacy.save_secret(self.output.checkpoint_dir)
        header = header_of(self.state)
        update_header = self._param_header if config.training.update == "gradients" else header
        pending: asyncio.Future[None] | None = None
        try:
            await self.open_pool()
            last = time.perf_counter()
            for server_round in range(first_round, config.rounds + 1):
                if self.privacy is not None:
                    try:
                        self.privacy.check_budget(server_round)
                    except BudgetExceeded as exc:
                        # A clean ending: the rounds so far are recorded and checkpointed, the model is saved.
                        self.stopped = str(exc)
                        log.warning("%s", exc)
                        break
                report = await self._train_round(server_round, header, update_header)
                if self._federated_due(server_round):
                    await self._federated_evaluation(report)
                now = time.perf_counter()
                report.wall_seconds, last = now - last, now
                if pending is not None:
                    await pending
                previous, self.state = self.state, report.state
                if self.transfer.send_only_changed:  # which tensors the next round must send to workers that kept these
                    await asyncio.to_thread(self.transfer.versions.advance, previous, self.state)
                del previous  # else the last round's model stays alive through the next round: a model's worth
                # Round r is evaluated, recorded and checkpointed while round r+1 trains: the held-out evaluation
                # stays off the federation's critical path. Strategies replace their state tensors rather than
                # change them, so this snapshot stays round r's.
                pending = asyncio.ensure_future(self._complete_round(report, self.strategy.state_dict()))
            if pending is not None:
                await pending
            self.save_final_model()
        finally:
            if pending is not None and not pending.done():
                # A later round failed: the round before it still gets its record and checkpoint.
                await asyncio.gather(pending, return_exceptions=True)
            await self.pool.close("training finished")
        return self.history

    async def open_pool(self) -> None:
        """Dial the configured workers, listen for those that dial in, and tell the display the run started."""
        config = self.config
        await self.pool.start()
        if config.listen is not None:
            self.listen_url = await self.pool.listen(host=config.listen.host, port=config.listen.port)
            self.listening.set()
        # Rows appear as workers connect, under their ids: see WorkerPool's observer.
        self.progress.run_started(config.name, config.rounds, [])

    def save_final_model(self) -> None:
        config = self.config
        self.output.save_model(
            self.state,
            {
                "name": config.name,
                "rounds": config.rounds,
                "factory": config.model.factory,
                "kwargs": config.model.kwargs,
                "fedlink": __version__,
            },
        )

    async def _complete_round(self, report: RoundReport, strategy_state: dict[str, Any]) -> None:
        record = await self._finish_round(report)
        self.history.append(record)
        self.output.write_round(record)
        self.output.write_workers([o.record(report.server_round) for o in report.outcomes])
        save_checkpoint(
            self.output.checkpoint_dir,
            Checkpoint(report.server_round, report.state, strategy_state, list(self.history), self.config.fingerprint()),
        )
        self.progress.round_finished(record)

    async def _train_round(self, server_round: int, header: StateHeader, update_header: StateHeader) -> RoundReport:
        """One round, tried again (same seeds, whoever is connected then) when too few workers answered."""
        config = self.config
        for attempt in range(config.timeouts.round_retries + 1):
            available = await self.pool.wait_for(config.sampling.min_workers, timeout=config.timeouts.wait_for_workers)
            if self.privacy is not None:
                self.privacy.attempt = attempt  # a retried round draws other noise and other coins
            if config.sampling.mode == "poisson":
                selected = self._poisson(available, server_round, attempt)
            else:
                selected = select_workers(
                    available, fraction=config.sampling.fraction, min_workers=config.sampling.min_workers,
                    seed=config.seed, server_round=server_round,
                )
            snapshot = self.strategy.state_dict()
            try:
                report = await run_round(
                    server_round,
                    selected,
                    global_state=self.state,
                    header=header,
                    update_header=update_header,
                    model=config.model,
                    plan=self._plan(server_round),
                    strategy=self.strategy,
                    seed=config.seed,
                    timeout=config.timeouts.round,
                    min_workers=config.sampling.min_workers,
                    run_id=self.run_id,
                    concurrent_uploads=upload_slots(
                        config.limits, update_header, spills=True, compression=self.transfer.compression
                    ),
                    observer=self.progress,
                    max_samples=self._sample_caps(selected),
                    max_update_norm=config.limits.max_update_norm,
                    max_weight_share=config.sampling.max_weight_share,
                    workflow=self.secure.run if self.secure is not None else None,
                    transfer=self.transfer,
                    spill=Spill(config.limits.spill_dir, config.limits.spill_bytes),
                )
                await self._check_new_state(report)
                return report
            except (NotEnoughWorkers, RoundRefused) as exc:
                if isinstance(exc, RoundRefused):
                    self.strategy.load_state_dict(snapshot)  # the refused round leaves no trace in the strategy
                if attempt == config.timeouts.round_retries:
                    raise
                log.warning("%s; trying round %d again (%d of %d)", exc, server_round, attempt + 1, config.timeouts.round_retries)
        raise AssertionError("unreachable")  # pragma: no cover

    def _poisson(self, available: list[RemoteWorker], server_round: int, attempt: int) -> list[RemoteWorker]:
        """``sampling.mode: poisson``: each connected worker with probability ``sampling.rate`` (see .privacy)."""
        from .privacy import poisson_select

        rate = self.config.sampling.rate
        assert rate is not None
        if self.privacy is not None:
            return self.privacy.select(available, [w.name for w in available], server_round, self.config.seed)
        return poisson_select(
            available, [w.name for w in available], rate=rate, server_round=server_round, attempt=attempt,
            noise=None, seed=self.config.seed,
        )

    def _sample_caps(self, workers: list[RemoteWorker]) -> dict[str, int]:
        """Per selected worker, the most samples its update may weigh: the smallest cap the config sets for it."""
        sampling = self.config.sampling
        by_url = {w.url: w.max_samples for w in self.config.workers if w.max_samples is not None}
        caps: dict[str, int] = {}
        for worker in workers:
            given = [sampling.max_samples, sampling.worker_max_samples.get(worker.name), by_url.get(worker.url)]
            found = [cap for cap in given if cap is not None]
            if found:
                caps[worker.name] = min(found)
        return caps

    async def _check_new_state(self, report: RoundReport) -> None:
        """Refuse a round whose new global state is not finite, before it replaces the model or is checkpointed."""
        bad = await asyncio.to_thread(non_finite, report.state)
        if bad:
            raise RoundRefused(
                f"round {report.server_round}: the aggregated model has NaN or infinite values in "
                f"{', '.join(bad[:5])}; it was not accepted and the previous model and checkpoint stand"
            )

    def _federated_due(self, server_round: int) -> bool:
        federated = self.config.evaluation.federated
        return federated is not None and (server_round % federated.every == 0 or server_round == self.config.rounds)

    async def _federated_evaluation(self, report: RoundReport) -> None:
        """Sampled workers evaluate the round's model on their shards; the figures join the round's report."""
        federated = self.config.evaluation.federated
        assert federated is not None
        available = self.pool.connected()
        selected = select_workers(
            available, fraction=federated.fraction, min_workers=federated.min_workers, seed=self.config.seed,
            server_round=report.server_round, purpose="evaluation",
        )
        stage = EvaluateStage(
            model=self.config.model, state=report.state, header=header_of(report.state), run_id=self.run_id,
            timeout=self.config.timeouts.round, batch_size=federated.batch_size, min_survivors=federated.min_workers,
        )
        outcome = await run_stage(report.server_round, stage, selected, observer=self.progress)
        report.outcomes.extend(outcome.outcomes)
        if len(outcome.results) < federated.min_workers:
            log.warning(
                "round %d: federated evaluation got %d answers, evaluation.federated.min_workers is %d; not recorded",
                report.server_round, len(outcome.results), federated.min_workers,
            )
            return
        accuracy, loss, samples = weighted_evaluation(list(outcome.results.values()))
        report.metrics.update(
            federated_accuracy=accuracy, federated_loss=loss, federated_workers=float(len(outcome.results)),
            federated_samples=float(samples),
        )

    async def _finish_round(self, report: RoundReport) -> dict[str, Any]:
        config = self.config
        started = time.perf_counter()
        accuracy = loss = roc_auc = None
        if self._eval_data is not None and (report.server_round % config.evaluation.every == 0 or report.server_round == config.rounds):
            metrics = await asyncio.to_thread(self._evaluate, report.state)
            accuracy, loss, roc_auc = metrics.accuracy, metrics.loss, metrics.roc_auc
        contributed = report.contributed
        total = sum(o.num_samples for o in contributed)
        train_loss = sum(o.metrics.get("loss", 0.0) * o.num_samples for o in contributed) / max(total, 1)
        if "secure_samples" in report.metrics:  # only the sum is known: counts and losses came through the mask
            total = round(report.metrics["secure_samples"])
            train_loss = report.metrics["secure_train_loss"]
        record = {
            "round": report.server_round,
            "rounds": config.rounds,
            "accuracy": accuracy,
            "loss": loss,
            **({"roc_auc": roc_auc} if roc_auc is not None else {}),
            "workers": len(contributed),
            "selected": len(report.trained),
            "samples": total,
            "train_loss": train_loss,
            "seconds": report.seconds + (time.perf_counter() - started),
            "round_seconds": report.seconds,
            "wall_seconds": report.wall_seconds,
            "slowest_train_seconds": max((o.train_seconds for o in contributed), default=0.0),
            "download_bytes": sum(o.download_bytes for o in report.trained),
            "upload_bytes": sum(o.upload_bytes for o in contributed),
            "spilled_bytes": sum(o.spilled_bytes for o in contributed),
            "dropped": {o.worker: o.reason for o in report.trained if o.status != "ok"},
        }
        # What the strategy (and federated evaluation) reported; never overwrites the fields above.
        record.update({k: v for k, v in report.metrics.items() if k not in record})
        if self.privacy is not None and self.privacy.mode == "local":
            spent = [o.metrics["epsilon"] for o in contributed if "epsilon" in o.metrics]
            record.update(self.privacy.local_record(spent, self.history))
        return record
