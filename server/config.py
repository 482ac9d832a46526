"""The job configuration (YAML), validated by pydantic; errors name the key, the value and what was expected.

Relative paths in a config file are relative to the file's folder, so a config and its data travel together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import ModelSpec, OptimizerSpec, UpdateKind

from .errors import ConfigError

__all__ = [
    "JobConfig",
    "WorkerEntry",
    "SamplingConfig",
    "TrainingConfig",
    "StrategyConfig",
    "TimeoutsConfig",
    "ListenConfig",
    "AuthConfig",
    "TLSConfig",
    "EvaluationConfig",
    "load_config",
    "parse_config",
    "format_validation_error",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerEntry(_Section):
    url: str
    token_file: Path | None = Field(None, description="this worker's own token; overrides auth.token_file")

    @field_validator("url")
    @classmethod
    def _websocket_url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("a worker URL starts with ws:// or wss://, e.g. ws://10.0.0.5:8777")
        return value


class SamplingConfig(_Section):
    fraction: float = Field(1.0, gt=0, le=1, description="share of the connected workers asked each round")
    min_workers: int = Field(1, ge=1, description="a round needs at least this many results")


class TrainingConfig(_Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: OptimizerSpec = OptimizerSpec()
    update: UpdateKind = "weights"
    grad_clip: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1, description="cap on local steps per round (per worker)")
    lr_decay: float = Field(1.0, gt=0, le=1, description="learning rate multiplier per round: lr * lr_decay**(round-1)")


class StrategyConfig(_Section):
    """``name`` plus the strategy's own parameters beside it (``{name: fedavgm, momentum: 0.9}``)."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TimeoutsConfig(_Section):
    round: float = Field(300.0, gt=0, description="seconds for a whole round, dispatch to aggregation")
    connect: float = Field(10.0, gt=0, description="seconds to open a connection and finish the handshake")
    wait_for_workers: float = Field(
        60.0, ge=0, description="before each round, seconds to wait for sampling.min_workers to be connected"
    )
    heartbeat: float = Field(5.0, gt=0, description="seconds between heartbeats; a peer silent 6x as long is dropped")
    reconnect_max: float = Field(10.0, gt=0, description="longest pause between attempts to reach a lost worker")
    round_retries: int = Field(
        2, ge=0, description="times a round is tried again when fewer than sampling.min_workers answered"
    )


class ListenConfig(_Section):
    """Where the coordinator accepts workers that dial in (``fl-worker --connect``)."""

    host: str = "127.0.0.1"
    port: int = Field(8700, ge=0, le=65535)
    max_connections: int = Field(1024, ge=1, description="most connections held at once; one more is refused")


class AuthConfig(_Section):
    """Tokens (see SECURITY.md). A dialled worker uses its entry's ``token_file``, else ``token_file`` here; a
    worker that dials in uses ``workers[its id]``, else ``token_file``. A worker listed in ``workers`` is checked
    against its own token only, so no holder of the shared token can take its place."""

    token_file: Path | None = Field(None, description="token shared by every worker without its own")
    workers: dict[str, Path] = Field(default_factory=dict, description="worker id -> token file, for dial-in workers")


class TLSConfig(_Section):
    """TLS for every connection: ``wss://`` worker URLs, and a ``wss://`` listener when ``listen`` is set."""

    ca: Path | None = Field(None, description="CA bundle that signed the workers' certificates [default: the system's]")
    cert: Path | None = Field(None, description="the coordinator's certificate: client certificate and listener's")
    key: Path | None = Field(None, description="private key of cert")
    require_client_cert: bool = Field(False, description="the listener requires dial-in workers' certificates (from ca)")

    @model_validator(mode="after")
    def _pairs(self) -> "TLSConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together")
        if self.require_client_cert and self.ca is None:
            raise ValueError("tls.require_client_cert needs tls.ca, the CA that signed the workers' certificates")
        return self


class EvaluationConfig(_Section):
    data: Path | None = Field(None, description="held-out set in the shard format, evaluated on the coordinator")
    every: int = Field(1, ge=1)
    batch_size: int = Field(512, ge=1)


class JobConfig(_Section):
    name: str = Field(min_length=1, max_length=128)
    seed: int = Field(0, ge=0, lt=1 << 63)
    model: ModelSpec
    workers: list[WorkerEntry] = Field(default_factory=list)
    listen: ListenConfig | None = None
    rounds: int = Field(ge=1)
    sampling: SamplingConfig = SamplingConfig()
    training: TrainingConfig = TrainingConfig()
    strategy: StrategyConfig = StrategyConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: Path = Path("runs/fedlink")
    limits: Limits = Limits()
    device: str = "cpu"
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig | None = None

    @field_validator("workers", mode="before")
    @classmethod
    def _url_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _enough_workers(self) -> "JobConfig":
        if not self.workers and self.listen is None:
            raise ValueError("no workers: list their URLs under workers, or set listen for workers that dial in")
        if self.listen is None and self.sampling.min_workers > len(self.workers):
            raise ValueError(
                f"sampling.min_workers is {self.sampling.min_workers} but only {len(self.workers)} workers are listed"
            )
        urls = [w.url for w in self.workers]
        duplicates = sorted({u for u in urls if urls.count(u) > 1})
        if duplicates:
            raise ValueError(f"workers lists {', '.join(duplicates)} more than once")
        return self

    @model_validator(mode="after")
    def _security(self) -> "JobConfig":
        if self.tls is not None:
            plain = [w.url for w in self.workers if not w.url.startswith("wss://")]
            if plain:
                raise ValueError(f"tls is configured but {', '.join(plain)} would be dialled in plain text; use wss://")
            if self.listen is not None and self.tls.cert is None:
                raise ValueError("listen with tls needs tls.cert and tls.key, the certificate workers will verify")
        if self.auth.workers and self.listen is None:
            raise ValueError("auth.workers names workers that dial in; set listen too (dialled workers take token_file)")
        return self

    def fingerprint(self) -> str:
        """A digest of everything that shapes the model's trajectory; a checkpoint only resumes a matching job."""
        keys = {"seed", "model", "training", "strategy", "sampling"}
        text = json.dumps(self.model_dump(mode="json", include=keys), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def resolve_paths(self, base: Path) -> "JobConfig":
        """Make relative paths relative to ``base`` (the config file's folder)."""
        update: dict[str, Any] = {}
        if not self.output.is_absolute():
            update["output"] = base / self.output
        evaluation = self.evaluation
        if evaluation.data is not None and not evaluation.data.is_absolute():
            evaluation = evaluation.model_copy(update={"data": base / evaluation.data})
            update["evaluation"] = evaluation
        update.update(self._resolve_security_paths(base))
        return self.model_copy(update=update)

    def _resolve_security_paths(self, base: Path) -> dict[str, Any]:
        """Token files and TLS files, like every other path: relative to the config file's folder."""

        def under(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else base / path

        return {
            "workers": [w.model_copy(update={"token_file": under(w.token_file)}) for w in self.workers],
            "auth": self.auth.model_copy(
                update={
                    "token_file": under(self.auth.token_file),
                    "workers": {k: under(v) for k, v in self.auth.workers.items()},
                }
            ),
            "tls": None if self.tls is None else self.tls.model_copy(
                update={"ca": under(self.tls.ca), "cert": under(self.tls.cert), "key": under(self.tls.key)}
            ),
        }


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the configuration"]
    for error in exc.errors():
        key = ".".join(str(p) for p in error.get("loc", ())) or "(top level)"
        value = error.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown key (check the spelling; see the config reference in README.md)"
        elif error.get("type") == "missing":
            lines.append(f"  {key}: missing; this key is required")
            continue
        lines.append(f"  {key} = {shown}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "config", base: Path | None = None) -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys (name, model, workers, ...), got {type(data).__name__}")
    try:
        config = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc
    return config.resolve_paths(base) if base is not None else config


def load_config(path: Path) -> JobConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, source=str(path), base=path.resolve().parent)
