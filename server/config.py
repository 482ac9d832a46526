"""The job configuration (YAML), validated by pydantic; errors name the key, the value and what was expected.

Relative paths in a config file are relative to the file's folder, so a config and its data travel together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from fedlink.compression import CompressionSpec, DownloadDtype
from fedlink.display import PEER_ID_PATTERN
from fedlink.privacy import PrivacyConfig
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import MAX_HEARTBEAT, MIN_HEARTBEAT, ModelSpec, OptimizerSpec, UpdateKind

from .errors import ConfigError
from .secure_config import SECURE_STRATEGIES_REFUSED, SecureAggregationConfig
from .simulation.config import SimulationConfig

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
    "FederatedEvaluationConfig",
    "MetricsConfig",
    "OutputOptions",
    "load_config",
    "parse_config",
    "format_validation_error",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerEntry(_Section):
    url: str
    token_file: Path | None = Field(None, description="this worker's own token; overrides auth.token_file")
    max_samples: int | None = Field(
        None, ge=1, description="most samples this worker's update may weigh in a round, whatever it reports"
    )

    @field_validator("url")
    @classmethod
    def _websocket_url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("a worker URL starts with ws:// or wss://, e.g. ws://10.0.0.5:8777")
        return value


class SamplingConfig(_Section):
    fraction: float = Field(1.0, gt=0, le=1, description="share of the connected workers asked each round")
    min_workers: int = Field(1, ge=1, description="a round needs at least this many results")
    max_samples: int | None = Field(
        None, ge=1, description="most samples any worker's update may weigh in a round, whatever it reports"
    )
    worker_max_samples: dict[Annotated[str, StringConstraints(pattern=PEER_ID_PATTERN)], Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="worker id -> most samples its update may weigh (dial-in or dialled)"
    )
    max_weight_share: float = Field(
        0.5, gt=0, le=1,
        description="no worker's update weighs more than this share of the selected workers' total; applies to "
        "rounds of more than 1/share workers (three or more for 0.5); 1 turns it off",
    )
    mode: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="fixed: a cohort of sampling.fraction; poisson: each worker independently with probability "
        "sampling.rate (the sampling differential privacy's accountant assumes)",
    )
    rate: float | None = Field(None, gt=0, le=1, description="poisson: each worker's probability of taking part in a round")

    @model_validator(mode="after")
    def _mode_fields(self) -> "SamplingConfig":
        if self.mode == "poisson":
            if self.rate is None:
                raise ValueError("sampling.mode poisson needs sampling.rate, each worker's probability per round (0, 1]")
            if self.fraction != 1.0:
                raise ValueError(
                    f"sampling.fraction ({self.fraction}) sizes fixed cohorts; with sampling.mode poisson give "
                    "sampling.rate only"
                )
        elif self.rate is not None:
            raise ValueError(
                f"sampling.rate ({self.rate}) is the probability of sampling.mode poisson; add mode: poisson, "
                "or use sampling.fraction for a fixed-size cohort"
            )
        return self


class TrainingConfig(_Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: OptimizerSpec = OptimizerSpec()
    update: UpdateKind = "weights"
    grad_clip: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1, description="cap on local steps per round (per worker)")
    lr_decay: float = Field(1.0, gt=0, le=1, description="learning rate multiplier per round: lr * lr_decay**(round-1)")
    compression: CompressionSpec = Field(
        CompressionSpec(), description="how updates travel: none, float16, bfloat16, int8 or topk (with ratio)"
    )
    download: DownloadDtype = Field("float32", description="dtype of the global state's floating-point tensors on the wire")
    upload: Literal["trainable", "all"] = Field(
        "trainable", description="trainable: frozen parameters (requires_grad False) are left out of updates"
    )
    send_only_changed: bool = Field(
        True, description="workers keep the frozen parameters of the last global state; those unchanged since are "
        "not sent again"
    )

    @model_validator(mode="after")
    def _compression_fits_update(self) -> "TrainingConfig":
        if self.compression.name in ("int8", "topk") and self.update == "weights":
            raise ValueError(
                f"training.compression {self.compression.name} quantises or drops values, which whole weights cannot "
                "afford: use training.update delta (or gradients)"
            )
        return self


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
    heartbeat: float = Field(
        5.0, ge=MIN_HEARTBEAT, le=MAX_HEARTBEAT, description="seconds between heartbeats; a peer silent 6x as long is dropped"
    )
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
    workers: dict[Annotated[str, StringConstraints(pattern=PEER_ID_PATTERN)], Path] = Field(
        default_factory=dict, description="worker id -> token file, for dial-in workers"
    )


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


class FederatedEvaluationConfig(_Section):
    """Sampled workers evaluate the global model on their own shards, every ``every`` rounds."""

    every: int = Field(1, ge=1, description="evaluate after every N-th round (and after the last)")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the connected workers asked to evaluate")
    min_workers: int = Field(1, ge=1, description="fewest answers for a recorded federated evaluation")
    batch_size: int = Field(256, ge=1)


class EvaluationConfig(_Section):
    data: Path | None = Field(None, description="held-out set in the shard format, evaluated on the coordinator")
    every: int = Field(1, ge=1)
    batch_size: int = Field(512, ge=1)
    federated: FederatedEvaluationConfig | None = Field(None, description="also evaluate on the workers' shards")


class MetricsConfig(_Section):
    """The coordinator's Prometheus endpoint, ``http://host:port/metrics``, served while the job runs."""

    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="0: any free port (the URL is printed at start)")
    per_worker: bool = Field(True, description="also series labelled by worker id (first 100 workers only)")


class OutputOptions(_Section):
    """What the run writes beside ``metrics.jsonl``; given as ``output: {dir: PATH, tensorboard: true}``."""

    tensorboard: bool = Field(False, description="write TensorBoard events live to OUTPUT/tensorboard")


class JobConfig(_Section):
    name: str = Field(min_length=1, max_length=128, pattern=PEER_ID_PATTERN, description="the job's name; its id in hellos")
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
    output_options: OutputOptions = OutputOptions()  # from the mapping form of output; see _output_forms
    metrics: MetricsConfig | None = None
    limits: Limits = Limits()
    device: str = "cpu"
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig | None = None
    simulation: SimulationConfig | None = Field(None, description="virtual workers (fl-coordinator simulate)")
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="the coordinator learns only the sum of the updates (see SECURITY.md)"
    )
    privacy: PrivacyConfig | None = Field(
        None, description="differential privacy: central, local or distributed (README, Differential privacy)"
    )

    @model_validator(mode="before")
    @classmethod
    def _output_forms(cls, data: Any) -> Any:
        """``output: PATH`` or ``output: {dir: PATH, tensorboard: BOOL}``; ``config.output`` is the path either way."""
        if isinstance(data, dict) and isinstance(data.get("output"), dict):
            given = dict(data["output"])
            unknown = sorted(set(given) - {"dir", *OutputOptions.model_fields})
            if unknown:
                raise ValueError(f"output: unknown key(s) {', '.join(unknown)}; output takes dir and tensorboard")
            data = {**data, "output": given.pop("dir", "runs/fedlink"), "output_options": given}
        return data

    @field_validator("workers", mode="before")
    @classmethod
    def _url_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _enough_workers(self) -> "JobConfig":
        if self.simulation is not None:
            if self.workers or self.listen is not None:
                raise ValueError("a simulation's workers are virtual: remove workers and listen, or remove simulation")
            if self.sampling.min_workers > self.simulation.workers:
                raise ValueError(
                    f"sampling.min_workers is {self.sampling.min_workers} but simulation.workers is "
                    f"{self.simulation.workers}"
                )
            return self
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

    @model_validator(mode="after")
    def _secure_aggregation(self) -> "JobConfig":
        if self.secure_aggregation is None:
            return self
        if self.strategy.name in SECURE_STRATEGIES_REFUSED:
            raise ValueError(
                f"strategy {self.strategy.name!r} needs each update on its own, but under secure_aggregation the "
                "coordinator sees only their sum; use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad"
            )
        if self.training.update == "gradients":
            raise ValueError("secure_aggregation sums deltas: use training.update 'delta' or 'weights' (sent as a delta)")
        if self.training.compression.name != "none":
            raise ValueError(
                "training.compression does not apply under secure_aggregation, which already sends each update as "
                "masked integers of secure_aggregation.bits; set training.compression to none"
            )
        if self.training.download != "float32":
            raise ValueError("training.download applies to plain rounds only; under secure_aggregation use float32")
        return self

    @model_validator(mode="after")
    def _privacy(self) -> "JobConfig":
        privacy = self.privacy
        if privacy is None:
            return self
        if privacy.mode in ("central", "distributed") and self.training.update == "gradients":
            raise ValueError(
                f"privacy.mode {privacy.mode} clips and noises whole updates: use training.update delta or weights"
            )
        if privacy.mode == "distributed" and self.secure_aggregation is None:
            raise ValueError("privacy.mode distributed adds the noise under secure aggregation: set secure_aggregation")
        if (
            privacy.mode == "distributed" and self.secure_aggregation is not None
            and privacy.clip_norm != self.secure_aggregation.clip_norm
        ):
            raise ValueError(
                f"privacy.clip_norm ({privacy.clip_norm}) must equal secure_aggregation.clip_norm "
                f"({self.secure_aggregation.clip_norm}) in mode distributed: the quantiser's clip is the noise's bound"
            )
        if privacy.mode == "central" and self.secure_aggregation is not None:
            raise ValueError(
                "privacy.mode central clips each update on the coordinator, which secure_aggregation hides from it: "
                "use privacy.mode distributed with secure_aggregation"
            )
        if privacy.mode == "local" and self.training.grad_clip is not None:
            raise ValueError(
                "training.grad_clip and privacy.mode local both clip: DP-SGD clips each example's gradient to "
                "privacy.clip_norm; remove training.grad_clip"
            )
        if privacy.mode == "local" and self.training.update == "gradients":
            raise ValueError("privacy.mode local trains with DP-SGD: use training.update delta or weights")
        return self

    def fingerprint(self) -> str:
        """A digest of everything that shapes the model's trajectory; a checkpoint only resumes a matching job."""
        keys = {"seed", "model", "training", "strategy", "sampling"}
        if self.secure_aggregation is not None:
            keys.add("secure_aggregation")
        if self.privacy is not None:
            keys.add("privacy")
        shaped = self.model_dump(mode="json", include=keys)
        if self.sampling.mode == "fixed":  # as before sampling.mode existed: older checkpoints still resume
            shaped["sampling"].pop("mode")
            shaped["sampling"].pop("rate")
        if self.training.compression.name == "none":  # as before compression existed: older checkpoints resume
            shaped["training"].pop("compression")
        if self.training.download == "float32":
            shaped["training"].pop("download")
        # What travels, not what is computed: the model's bytes are the same (but for the rounding of a float32 mean
        # of equal frozen weights, which upload: all folds and trainable keeps as they were).
        shaped["training"].pop("upload")
        shaped["training"].pop("send_only_changed")
        if self.privacy is not None:  # a stopping rule, not the trajectory: a run may resume with a larger budget
            shaped["privacy"].pop("max_epsilon")
        if self.simulation is not None:  # the virtual workers' data, not how many processes run them
            shaped["simulation"] = self.simulation.model_dump(mode="json", include={"data", "workers", "partition"})
        text = json.dumps(shaped, sort_keys=True)
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
        if self.simulation is not None:
            update["simulation"] = self.simulation.resolve(base)
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
        if key.startswith("output_options."):  # written as output: {dir: ..., tensorboard: ...}
            key = "output." + key.removeprefix("output_options.")
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
