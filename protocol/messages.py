"""The control messages of protocol version 1, one pydantic model per ``type``.

Every message carries ``type`` (its tag), ``v`` (the protocol version), ``id`` (unique per sender and session)
and, for answers, ``reply_to``. A message may announce a model state in ``state``; the state's bytes follow only
when the receiver asks for them with :class:`Pull` (so a busy or unwilling receiver never pays for a transfer, and
a receiver bounds how many states it takes in at once). The wire layout of a frame is in :mod:`.frames`.

When both hellos say ``auth``, the handshake goes on with :class:`AuthChallenge` and :class:`AuthProof` from each
side (see :mod:`.auth`); nothing else may be sent before it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from ..display import PEER_ID_PATTERN
from .tensors import StateHeader

__all__ = [
    "PROTOCOL_VERSION",
    "StateCache",
    "MIN_HEARTBEAT",
    "MAX_HEARTBEAT",
    "Message",
    "DatasetInfo",
    "Hello",
    "AUTH_SCHEME",
    "AuthChallenge",
    "AuthProof",
    "ModelSpec",
    "OptimizerSpec",
    "TrainingPlan",
    "PrivacyPlan",
    "HookSpec",
    "UpdateKind",
    "TrainRequest",
    "TrainResult",
    "EvaluateRequest",
    "EvaluateResult",
    "StageRequest",
    "StageResult",
    "RoundEnd",
    "Heartbeat",
    "ErrorMessage",
    "Pull",
    "Discard",
    "Bye",
    "AnyMessage",
    "MESSAGE_ADAPTER",
]

PROTOCOL_VERSION = 1
#: The bounds of the heartbeat interval a hello may ask for, in seconds.
MIN_HEARTBEAT = 0.5
MAX_HEARTBEAT = 3600.0

UpdateKind = Literal["weights", "delta", "gradients"]

#: The one authentication scheme of protocol version 1 (see :mod:`.auth`).
AUTH_SCHEME = "hmac-sha256"
_HEX32 = r"^[0-9a-f]{64}$"  # 32 bytes as lowercase hex: msgpack ``bin`` is refused in control frames
_CACHE_KEY = r"^[0-9a-z:.-]{1,96}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    """Fields every message has; the session layer fills ``id``, ``reply_to`` and ``state``."""

    if TYPE_CHECKING:
        type: str  # every concrete message declares its tag as a Literal field

    v: int = PROTOCOL_VERSION
    id: int = Field(0, ge=0, lt=1 << 63)
    reply_to: int | None = Field(None, ge=0, lt=1 << 63)
    state: StateHeader | None = None


class DatasetInfo(_Strict):
    """What a worker says about its shard: sizes and types, never values."""

    num_samples: int = Field(ge=0)
    sample_shape: tuple[int, ...] = Field(max_length=16)
    x_dtype: str = Field(max_length=32)


class Hello(Message):
    """First message of each side, whichever side dialled."""

    type: Literal["hello"] = "hello"
    role: Literal["worker", "coordinator"]
    # Ids are shown in logs and on the operator's terminal: restricted to characters nothing interprets.
    peer_id: str = Field(min_length=1, max_length=128, pattern=PEER_ID_PATTERN)
    software: str = Field("", max_length=128)
    capabilities: tuple[Annotated[str, StringConstraints(max_length=64)], ...] = Field((), max_length=32)
    dataset: DatasetInfo | None = None
    # Bounded both ways: a peer must not make us send heartbeats in a busy loop, nor silence us for days.
    heartbeat: float = Field(
        5.0, ge=MIN_HEARTBEAT, le=MAX_HEARTBEAT, description="send me a heartbeat at least this often (seconds)"
    )
    # Said before anything else, so that a side with a token and a side without one both see the mismatch and
    # both report it, instead of one of them timing out waiting for a challenge.
    auth: Literal["hmac-sha256"] | None = Field(None, description="this side requires the peer to authenticate")


class AuthChallenge(Message):
    """Second message of each side when both hellos say ``auth``: 32 fresh random bytes, as hex."""

    type: Literal["auth_challenge"] = "auth_challenge"
    nonce: str = Field(pattern=_HEX32)


class AuthProof(Message):
    """Third message: HMAC-SHA256 over both hellos and both nonces under the shared token (see :mod:`.auth`)."""

    type: Literal["auth_proof"] = "auth_proof"
    mac: str = Field(pattern=_HEX32)


class ModelSpec(_Strict):
    """A model by reference: both sides import ``factory`` ("module:callable"); code never travels."""

    factory: str = Field(min_length=3, max_length=256)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False


class HookSpec(_Strict):
    """One step of the worker's local-training pipeline, by name, with its parameters.

    Built-in hooks have short names (``proximal``, ``grad_clip``); a third-party hook is a ``module:Class`` path
    that a worker imports only if its operator allowed it (``fl-worker --allow-plugin``).
    """

    name: str = Field(min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)


class PrivacyPlan(_Strict):
    """The round's differential privacy, announced to every worker (``fl-worker --require-dp`` reads ``mode``).

    ``local``: the worker trains with DP-SGD (per-example ``clip_norm``, ``noise_multiplier`` or, solved by the
    worker over ``rounds`` planned rounds, ``target_epsilon``) and reports the epsilon its own accountant spent.
    ``central`` and ``distributed``: the coordinator (or, distributed, the workers under secure aggregation) clip
    and noise whole updates; the worker trains as usual. Absent from the wire when a round has no DP.
    """

    mode: Literal["central", "local", "distributed"]
    clip_norm: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float | None = Field(None, gt=0, le=1e4)
    target_epsilon: float | None = Field(None, gt=0, le=1e4)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    rounds: int = Field(1, ge=1, le=1 << 31)


class TrainingPlan(_Strict):
    """How a worker trains this round. ``hooks`` run in order around the local step (FedProx's proximal term,
    gradient clipping...); strategies add theirs in ``configure_train``. ``privacy`` announces the round's
    differential privacy (None: none)."""

    epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=1 << 20)
    optimizer: OptimizerSpec = OptimizerSpec()
    update: UpdateKind = "weights"
    seed: int = Field(0, ge=0, lt=1 << 63)
    max_steps: int | None = Field(None, ge=1)
    hooks: tuple[HookSpec, ...] = Field((), max_length=32)
    privacy: PrivacyPlan | None = None
    # The global state's floating-point tensors travel in this dtype (training.download); None: as they are.
    download: Literal["float16", "bfloat16"] | None = None
    # "trainable": leave out of the update the parameters the model freezes (requires_grad False); None: all.
    upload: Literal["trainable"] | None = None

    def with_hook(self, hook: HookSpec) -> "TrainingPlan":
        """A copy with ``hook`` added (or replacing the hook of the same name, keeping its place)."""
        hooks = list(self.hooks)
        for i, existing in enumerate(hooks):
            if existing.name == hook.name:
                hooks[i] = hook
                break
        else:
            hooks.append(hook)
        return self.model_copy(update={"hooks": tuple(hooks)})

    def hook(self, name: str) -> HookSpec | None:
        return next((h for h in self.hooks if h.name == name), None)


class StateCache(_Strict):
    """The global state travels only in part: the worker keeps the frozen parameters of the last one it was sent
    (one, for one run).

    ``base`` names the state the coordinator believes the worker keeps (None: everything is sent); the tensors the
    request does not announce are taken from it. ``key`` names the state this request puts together, whose frozen
    parameters the worker keeps in its place. Keys are the coordinator's, opaque to the worker.
    """

    base: str | None = Field(None, pattern=_CACHE_KEY)
    key: str = Field(pattern=_CACHE_KEY)


class TrainRequest(Message):
    """Train on the announced global state. ``run`` keys the worker's per-run store (error feedback, control
    variates, privacy accountants) and its per-round context."""

    type: Literal["train"] = "train"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    model: ModelSpec
    plan: TrainingPlan
    run: str = Field("", max_length=128)
    # Which virtual worker of a simulation host serves this request; absent (and off the wire) for a real worker.
    worker: str | None = Field(None, max_length=128, pattern=PEER_ID_PATTERN)
    # Only the tensors that changed travel (see StateCache); absent: the whole state does.
    cache: StateCache | None = None


class TrainResult(Message):
    """Answer to :class:`TrainRequest`; ``state`` announces the update (weights, delta or gradients)."""

    type: Literal["train_result"] = "train_result"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    update: UpdateKind
    num_samples: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    train_seconds: float = Field(0.0, ge=0)


class EvaluateRequest(Message):
    type: Literal["evaluate"] = "evaluate"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    model: ModelSpec
    batch_size: int = Field(256, ge=1, le=1 << 20)
    run: str = Field("", max_length=128)
    # Which virtual worker of a simulation host serves this request; absent (and off the wire) for a real worker.
    worker: str | None = Field(None, max_length=128, pattern=PEER_ID_PATTERN)


class EvaluateResult(Message):
    type: Literal["evaluate_result"] = "evaluate_result"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    num_samples: int = Field(ge=0)
    loss: float
    accuracy: float


class StageRequest(Message):
    """One stage of a multi-stage round, served by the worker-side handler named in ``handler``.

    ``payload`` is validated on the worker by the handler's own request model; ``state`` may announce a model state.
    Handlers other than the built-in ones are ``module:Class`` paths the worker's operator must allow.
    """

    type: Literal["stage"] = "stage"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    stage: str = Field(min_length=1, max_length=64)
    handler: str = Field(min_length=1, max_length=256)
    run: str = Field("", max_length=128)
    payload: dict[str, Any] = Field(default_factory=dict)
    # Which virtual worker of a simulation host serves this request; absent (and off the wire) for a real worker.
    worker: str | None = Field(None, max_length=128, pattern=PEER_ID_PATTERN)


class StageResult(Message):
    """Answer to :class:`StageRequest`; ``payload`` is checked by the coordinator-side stage's result model."""

    type: Literal["stage_result"] = "stage_result"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    payload: dict[str, Any] = Field(default_factory=dict)


class RoundEnd(Message):
    """Coordinator to worker: round ``round`` of ``run`` is over; drop its per-round context. No answer."""

    type: Literal["round_end"] = "round_end"
    round: int = Field(ge=0)
    run: str = Field("", max_length=128)
    # Which virtual worker of a simulation host serves this request; absent (and off the wire) for a real worker.
    worker: str | None = Field(None, max_length=128, pattern=PEER_ID_PATTERN)


class Heartbeat(Message):
    type: Literal["heartbeat"] = "heartbeat"


class ErrorMessage(Message):
    """A refusal or failure; ``code`` is stable and machine-readable, ``message`` is for people.

    ``ref`` names the announced state a failed transfer belongs to, when the error is about one.
    """

    type: Literal["error"] = "error"
    code: str = Field(min_length=1, max_length=64)
    message: str = Field("", max_length=4096)
    ref: int | None = Field(None, ge=0, lt=1 << 63)


class Pull(Message):
    """Receiver to sender: send me the state announced in your message ``ref`` now."""

    type: Literal["pull"] = "pull"
    ref: int = Field(ge=0, lt=1 << 63)


class Discard(Message):
    """Receiver to sender: I will not take the state announced in ``ref``; free it."""

    type: Literal["discard"] = "discard"
    ref: int = Field(ge=0, lt=1 << 63)


class Bye(Message):
    type: Literal["bye"] = "bye"
    reason: str = Field("", max_length=1024)


AnyMessage = Annotated[
    Union[
        Hello,
        AuthChallenge,
        AuthProof,
        TrainRequest,
        TrainResult,
        EvaluateRequest,
        EvaluateResult,
        StageRequest,
        StageResult,
        RoundEnd,
        Heartbeat,
        ErrorMessage,
        Pull,
        Discard,
        Bye,
    ],
    Field(discriminator="type"),
]

MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyMessage)
