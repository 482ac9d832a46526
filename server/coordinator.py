"""A training job from start to end: connect the workers, run the rounds, evaluate, write the results."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from typing import Any

import torch

from fedlink.factory import ModelAllowList, build_model
from fedlink.protocol.messages import Hello, TrainingPlan
from fedlink.protocol.session import SessionOptions
from fedlink.protocol.tensors import State, header_of
from fedlink.shards import load_shard
from fedlink.training import Metrics, evaluate

from . import __version__
from .config import JobConfig
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import ConfigError
from .output import RunOutput
from .pool import WorkerPool
from .progress import Progress
from .remote import RemoteWorker
from .rounds import RoundReport, derive_seed, run_round
from .security import Security
from .strategy import Strategy, build_strategy

__all__ = ["Coordinator", "select_workers", "initial_state"]

log = logging.getLogger("fedlink.server")

# The coordinator runs the operator's own config, so it may build any factory it names.
_TRUST_CONFIG = ModelAllowList(("*",))


def select_workers(available: list[RemoteWorker], *, fraction: float, min_workers: int, seed: int, server_round: int) -> list[RemoteWorker]:
    """A seeded sample of ``ceil(fraction * n)`` (at least ``min_workers``) workers, in configured order."""
    count = min(len(available), max(min_workers, math.ceil(fraction * len(available))))
    if count >= len(available):
        return list(available)
    rng = random.Random(derive_seed(seed, server_round, "sampling"))
    chosen = set(rng.sample(range(len(available)), count))
    return [w for i, w in enumerate(available) if i in chosen]


def initial_state(config: JobConfig) -> tuple[torch.nn.Module, State]:
    torch.manual_seed(config.seed)
    model = build_model(config.model.factory, config.model.kwargs, _TRUST_CONFIG)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


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
        )
        self.output = RunOutput(config.output)
        self.model, self.state = initial_state(config)
        self.strategy: Strategy = build_strategy(config.strategy.name, config.strategy.params())
        if config.sampling.min_workers < self.strategy.min_updates:
            raise ConfigError(
                f"sampling.min_workers is {config.sampling.min_workers} but strategy {config.strategy.name!r} "
                f"needs at least {self.strategy.min_updates} updates per round"
            )
        self.strategy.configure_train(1, self._plan())  # refuses now what a round would refuse later
        self.history: list[dict[str, Any]] = []
        self.listen_url: str | None = None
        self.listening = asyncio.Event()
        self._eval_data: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.evaluation.data is not None:
            self._eval_data = load_shard(config.evaluation.data).to_tensors()

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
        return TrainingPlan(
            epochs=t.epochs,
            batch_size=t.batch_size,
            optimizer=t.optimizer.model_copy(update={"lr": lr}),
            update=t.update,
            grad_clip=t.grad_clip,
            max_steps=t.max_steps,
        )

    def _evaluate(self, state: State) -> Metrics:
        self.model.load_state_dict(state)
        assert self._eval_data is not None
        return evaluate(self.model, *self._eval_data, batch_size=self.config.evaluation.batch_size, device=self.config.device)

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
        self.strategy.load_state_dict(checkpoint.strategy)
        self.history = checkpoint.history
        self.output.restore(self.history)
        log.info("resuming after round %d", checkpoint.server_round)
        return checkpoint.server_round + 1

    async def run(self, *, resume: bool = False) -> list[dict[str, Any]]:
        """Run the job (from the last checkpoint with ``resume``); returns one record per round."""
        config = self.config
        first_round = self._resume() if resume else 1
        if not resume:
            self.output.start()
        header = header_of(self.state)
        update_header = (
            header_of(dict(self.model.named_parameters())) if config.training.update == "gradients" else header
        )
        try:
            await self.pool.start()
            if config.listen is not None:
                self.listen_url = await self.pool.listen(host=config.listen.host, port=config.listen.port)
                self.listening.set()
            self.progress.run_started(config.name, config.rounds, [w.url for w in self.workers])
            for server_round in range(first_round, config.rounds + 1):
                available = await self.pool.wait_for(
                    config.sampling.min_workers, timeout=config.timeouts.wait_for_workers
                )
                selected = select_workers(
                    available, fraction=config.sampling.fraction, min_workers=config.sampling.min_workers,
                    seed=config.seed, server_round=server_round,
                )
                loop = asyncio.get_running_loop()
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
                    deadline=loop.time() + config.timeouts.round,
                    min_workers=config.sampling.min_workers,
                    observer=self.progress,
                )
                self.state = report.state
                record = await self._finish_round(report)
                self.history.append(record)
                self.output.write_round(record)
                save_checkpoint(
                    self.output.checkpoint_dir,
                    Checkpoint(server_round, self.state, self.strategy.state_dict(), self.history, config.fingerprint()),
                )
                self.progress.round_finished(record)
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
        finally:
            await self.pool.close("training finished")
        return self.history

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
        return {
            "round": report.server_round,
            "rounds": config.rounds,
            "accuracy": accuracy,
            "loss": loss,
            **({"roc_auc": roc_auc} if roc_auc is not None else {}),
            "workers": len(contributed),
            "selected": len(report.outcomes),
            "samples": total,
            "train_loss": train_loss,
            "seconds": report.seconds + (time.perf_counter() - started),
            "round_seconds": report.seconds,
            "slowest_train_seconds": max((o.train_seconds for o in contributed), default=0.0),
            "dropped": {o.worker: o.reason for o in report.outcomes if o.status != "ok"},
        }
