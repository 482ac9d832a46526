"""The ``simulation:`` section of a job: virtual workers cut from one data set, run by a few long-lived hosts.

A simulated job has the same keys as a real one, with ``simulation`` in place of ``workers``::

    simulation:
      data: train.npy                 # one shard-format file, split into virtual workers like `fl-coordinator split`
      workers: 1000
      partition: {dirichlet: 0.5}     # iid | {dirichlet: A} | {classes_per_worker: K} | {quantity: A}
      backend: local                  # local | ray
      processes: 2                    # local: long-lived host processes; ray: actors
      resources: {cpus: 1, gpus: 0}   # per process or actor
      policy: {min_batch_size: 16}    # every virtual worker's policy, as fl-worker's flags (default: admits all)

The partition is drawn from ``seed`` (the job's), so a config names its virtual workers' data exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlink.worker.policy import WorkerPolicy

__all__ = ["PartitionConfig", "ResourcesConfig", "SimulationConfig", "PARTITION_KINDS"]

#: The partitions a simulation (and ``fl-coordinator split``) can draw; the value each takes, if any.
PARTITION_KINDS: dict[str, str] = {
    "iid": "",
    "dirichlet": "alpha > 0: Dirichlet label skew, smaller is more skewed",
    "classes_per_worker": "k >= 1: each virtual worker holds k label-sorted shards",
    "quantity": "alpha > 0: Dirichlet shard sizes, IID content",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PartitionConfig(_Section):
    """How the data is cut, written as users write it: ``iid``, ``{dirichlet: 0.5}``, ``{classes_per_worker: 2}``,
    ``{quantity: 1.0}``; normalised to ``kind`` and ``value``."""

    kind: Literal["iid", "dirichlet", "classes_per_worker", "quantity"] = "iid"
    value: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {data: None}
        if isinstance(data, dict) and data and "kind" not in data:
            if len(data) != 1:
                raise ValueError(
                    f"name one partition, e.g. {{dirichlet: 0.5}}; got {sorted(map(str, data)) or 'nothing'} "
                    f"(one of {', '.join(PARTITION_KINDS)})"
                )
            ((kind, value),) = data.items()
            if kind not in PARTITION_KINDS:
                raise ValueError(f"unknown partition {kind!r}; expected one of {', '.join(PARTITION_KINDS)}")
            if kind == "iid":
                return {"kind": "iid", "value": 0.0}
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"partition {kind} takes a number ({PARTITION_KINDS[kind]}), got {value!r}")
            return {"kind": kind, "value": value}
        return data

    @model_validator(mode="after")
    def _value(self) -> "PartitionConfig":
        if self.kind in ("dirichlet", "quantity") and not self.value > 0:
            raise ValueError(f"partition {self.kind} needs alpha > 0, got {self.value!r}")
        if self.kind == "classes_per_worker" and (self.value < 1 or self.value != int(self.value)):
            raise ValueError(f"partition classes_per_worker needs a whole number >= 1, got {self.value!r}")
        return self


class ResourcesConfig(_Section):
    """What each host process or Ray actor gets: ``cpus`` (its torch threads, and Ray's reservation) and ``gpus``
    (a fraction of one GPU: Ray's reservation, and a hard cap on the host's share of the GPU's memory)."""

    cpus: float = Field(1.0, gt=0, le=1024)
    gpus: float = Field(0.0, ge=0, le=64)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


class SimulationConfig(_Section):
    data: Path = Field(description="one shard-format file (.npy or .npz) cut into the virtual workers' shards")
    workers: int = Field(ge=1, le=1_000_000, description="number of virtual workers")
    partition: PartitionConfig = PartitionConfig()
    backend: Literal["local", "ray"] = "local"
    processes: int = Field(1, ge=1, le=1024, description="local: host processes; ray: actors")
    resources: ResourcesConfig = ResourcesConfig()
    ray_address: str | None = Field(None, description="an existing Ray cluster (ray://host:10001 or auto); default: start one")
    policy: WorkerPolicy = Field(
        default_factory=lambda: WorkerPolicy(min_batch_size=1, min_samples=1),
        description="every virtual worker's policy (the keys of fl-worker --policy); by default small shards pass",
    )

    @model_validator(mode="after")
    def _ray_only(self) -> "SimulationConfig":
        if self.ray_address is not None and self.backend != "ray":
            raise ValueError("simulation.ray_address needs backend: ray")
        return self

    def resolve(self, base: Path) -> "SimulationConfig":
        return self if self.data.is_absolute() else self.model_copy(update={"data": base / self.data})
