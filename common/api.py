"""The Python API: train from a script or a notebook, start workers on loopback, watch the run with a callback.

``import fedlink`` stays light: these names are imported on first use (see ``fedlink.__getattr__``)::

    import fedlink

    with fedlink.LocalWorkers(["shard-0.npy", "shard-1.npy"]) as workers:
        history = fedlink.train({"name": "demo", "model": {...}, "workers": workers.urls, "rounds": 5})
    print(history[-1].accuracy)

Inside a running event loop (a Jupyter notebook), ``await fedlink.train_async(config)`` does the same.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

from pydantic import BaseModel, ConfigDict

from .errors import FedlinkError

if TYPE_CHECKING:
    from fedlink.server.config import JobConfig
    from fedlink.server.localworkers import LocalWorker
    from fedlink.server.observers import ProgressEvent
    from fedlink.server.progress import Progress

__all__ = [
    "RoundRecord", "train", "train_async", "simulate", "simulate_async", "LocalWorkers", "ConfigLike", "ProgressLike",
]

ConfigLike = Union[str, "os.PathLike[str]", Mapping[str, Any], "JobConfig"]
ProgressLike = Union["Progress", Callable[["ProgressEvent"], object], None]


class RoundRecord(BaseModel):
    """One round of a run, as in ``metrics.jsonl``; fields added by later versions are kept (``extra``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    round: int
    rounds: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    roc_auc: float | None = None
    workers: int = 0
    selected: int = 0
    samples: int = 0
    train_loss: float | None = None
    seconds: float = 0.0
    round_seconds: float | None = None
    wall_seconds: float | None = None
    slowest_train_seconds: float | None = None
    dropped: dict[str, str] = {}
    epsilon: float | None = None


def _job_config(config: ConfigLike) -> "JobConfig":
    from fedlink.server.config import JobConfig, load_config, parse_config

    if isinstance(config, JobConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(Path(config))
    if isinstance(config, Mapping):
        return parse_config(dict(config), source="fedlink.train config")
    raise TypeError(f"config must be a path, a mapping or a JobConfig, not {type(config).__name__}")


def _display(progress: ProgressLike) -> "Progress":
    """The caller's observer; a plain callable becomes a CallbackProgress; None: the rich table on a terminal,
    log lines elsewhere."""
    from fedlink.server.observers import CallbackProgress
    from fedlink.server.progress import Progress, make_progress

    if progress is None:
        return make_progress()
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return CallbackProgress(progress)
    raise TypeError(f"progress must be a Progress, a callable taking a ProgressEvent, or None; not {progress!r}")


async def train_async(config: ConfigLike, *, resume: bool = False, progress: ProgressLike = None) -> list[RoundRecord]:
    """Run a training job inside the running event loop; returns one :class:`RoundRecord` per round."""
    from fedlink.server.coordinator import Coordinator
    from fedlink.server.observers import run_observers

    job = _job_config(config)
    with run_observers(job, _display(progress)) as observers:
        coordinator = Coordinator(job, progress=observers)
        observers.bind(coordinator)
        history = await coordinator.run(resume=resume)
    return [RoundRecord.model_validate(record) for record in history]


def train(config: ConfigLike, *, resume: bool = False, progress: ProgressLike = None) -> list[RoundRecord]:
    """Run a training job to its end: ``config`` is a YAML path, a mapping of the same keys, or a JobConfig.

    ``progress`` is a callable receiving a :class:`~fedlink.server.observers.ProgressEvent` per event (rounds,
    worker states), or any Progress observer. Raises :class:`~fedlink.errors.FedlinkError` subclasses with the
    coordinator's own messages. In a running event loop (notebooks), use ``await train_async(...)``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(train_async(config, resume=resume, progress=progress))
    raise RuntimeError(
        "fedlink.train() runs its own event loop, and one is already running here (a notebook?): "
        "use `await fedlink.train_async(config)` instead"
    )


async def simulate_async(
    config: ConfigLike, *, resume: bool = False, progress: ProgressLike = None
) -> list[RoundRecord]:
    """Run a job's rounds over its virtual workers (its ``simulation`` section) inside the running event loop."""
    from fedlink.server.observers import run_observers
    from fedlink.server.simulation.run import simulate_async as run_simulation

    job = _job_config(config)
    with run_observers(job, _display(progress)) as observers:
        history = await run_simulation(job, progress=observers, resume=resume)
    return [RoundRecord.model_validate(record) for record in history]


def simulate(config: ConfigLike, *, resume: bool = False, progress: ProgressLike = None) -> list[RoundRecord]:
    """Like :func:`train`, over the virtual workers of ``config``'s ``simulation`` section (no workers to start)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(simulate_async(config, resume=resume, progress=progress))
    raise RuntimeError(
        "fedlink.simulate() runs its own event loop, and one is already running here (a notebook?): "
        "use `await fedlink.simulate_async(config)` instead"
    )


class LocalWorkers:
    """``fl-worker`` processes on loopback, one per shard, named ``worker-0``...; stopped on leaving the ``with``.

    ``token_file`` gives every worker that token (the coordinator needs ``auth: {token_file: ...}``); ``args``
    are more ``fl-worker`` options (``["--threads", "1"]``). ``urls`` are what a config's ``workers`` takes.
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        *,
        token_file: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        ready_timeout: float = 60.0,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("LocalWorkers needs at least one shard")
        self.shards = [Path(s) for s in shards]
        self.args = [*args, *(["--token-file", str(token_file)] if token_file is not None else [])]
        self.ready_timeout = ready_timeout
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.workers: list[LocalWorker] = []

    @property
    def urls(self) -> list[str]:
        return [w.url for w in self.workers]

    def start(self) -> "LocalWorkers":
        from fedlink.server.localworkers import start_workers

        if self.workers:
            raise FedlinkError("these workers are already started")
        if self.log_dir is None:
            self.workers = start_workers(self.shards, extra_args=self.args, ready_timeout=self.ready_timeout)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            from fedlink.server.localworkers import spawn_worker, wait_ready

            spawned = [
                spawn_worker(shard, worker_id=f"worker-{i}", extra_args=self.args,
                             log_path=self.log_dir / f"worker-{i}.log")
                for i, shard in enumerate(self.shards)
            ]
            try:
                for one in spawned:
                    self.workers.append(wait_ready(one, timeout=self.ready_timeout))
            except BaseException:
                for one in spawned:
                    if one.process.poll() is None:
                        one.process.kill()
                        one.process.wait()
                self.workers = []
                raise
        return self

    def stop(self) -> list[int]:
        """SIGTERM every worker (SIGKILL after 15 s); returns their exit statuses."""
        from fedlink.server.localworkers import stop_workers

        workers, self.workers = self.workers, []
        stop_workers(workers)
        return [w.process.returncode for w in workers]

    def __enter__(self) -> "LocalWorkers":
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
