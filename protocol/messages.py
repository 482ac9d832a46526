"""The control messages of protocol version 1, one pydantic model per ``type``.

Every message carries ``type`` (its tag), ``v`` (the protocol version), ``id`` (unique per sender and session)
and, for answers, ``reply_to``. A message may announce a model state in ``state``; the state's bytes follow only
when the receiver asks for them with :class:`Pull` (so a busy or unwilling receiver never pays for a transfer, and
a receiver bounds how many states it takes in at once). The wire layout of a frame is in :mod:`.frames`.

When both hellos say ``auth``, the handshake goes on with :class:`AuthChallenge` and :class:`AuthProof` from each
side (see :mod:`.auth`); nothing else may be sent before it ends.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .tensors import StateHeader

__all__ = [
    "PROTOCOL_VERSION",
    "Message",
    "DatasetInfo",
    "Hello",
    "AUTH_SCHEME",
    "AuthChallenge",
    "AuthProof",
    "ModelSpec",
    "OptimizerSpec",
    "TrainingPlan",
    "UpdateKind",
    "TrainRequest",
    "TrainResult",
    "EvaluateRequest",
    "EvaluateResult",
    "Heartbeat",
    "ErrorMessage",
    "Pull",
    "Discard",
    "Bye",
    "AnyMessage",
    "MESSAGE_ADAPTER",
]

PROTOCOL_VERSION = 1

UpdateKind = Literal["weights", "delta", "gradients"]

#: The one authentication scheme of protocol version 1 (see :mod:`.auth`).
AUTH_SCHEME = "hmac-sha256"
_HEX32 = r"^[0-9a-f]{64}$"  # 32 bytes as lowercase hex: msgpack ``bin`` is refused in control frames


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    """Fields every message has; the session layer fills ``id``, ``reply_to`` and ``state``."""

    v: int = PROTOCOL_VERSION
    id: int = Field(0, ge=0, lt=1 << 63)
    reply_to: int | None = Field(None, ge=0, lt=1 << 63)
    state: StateHeader | None = None


class DatasetInfo(_Strict):
    """What a worker says about its shard: sizes and types, never values."""

    num_samples: int = Field(ge=0)
    sample_shape: tuple[int, ...]
    x_dtype: str


class Hello(Message):
    """First message of each side, whichever side dialled."""

    type: Literal["hello"] = "hello"
    role: Literal["worker", "coordinator"]
    peer_id: str = Field(min_length=1, max_length=128)
    software: str = Field("", max_length=128)
    capabilities: tuple[str, ...] = ()
    dataset: DatasetInfo | None = None
    heartbeat: float = Field(5.0, gt=0, le=3600, description="send me a heartbeat at least this often (seconds)")
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


class TrainingPlan(_Strict):
    """How a worker trains this round; strategies may set per-round extras (e.g. FedProx's ``proximal_mu``)."""

    epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=1 << 20)
    optimizer: OptimizerSpec = OptimizerSpec()
    update: UpdateKind = "weights"
    seed: int = Field(0, ge=0, lt=1 << 63)
    grad_clip: float | None = Field(None, gt=0)
    proximal_mu: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1)


class TrainRequest(Message):
    type: Literal["train"] = "train"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    model: ModelSpec
    plan: TrainingPlan


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


class EvaluateResult(Message):
    type: Literal["evaluate_result"] = "evaluate_result"
    round: int = Field(ge=0)
    task_id: str = Field(min_length=1, max_length=128)
    num_samples: int = Field(ge=0)
    loss: float
    accuracy: float


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
        Heartbeat,
        ErrorMessage,
        Pull,
        Discard,
        Bye,
    ],
    Field(discriminator="type"),
]

MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyMessage)
