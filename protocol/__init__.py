"""fedlink's wire protocol: messages, the tensor codec, frames (pure), and the session layer over a channel."""

from .auth import Keyring, Secret
from .channel import Channel, ChannelClosed, memory_pair
from .errors import (
    AuthenticationFailed,
    CredentialsError,
    HandshakeFailed,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    SessionClosed,
    StateMismatch,
    TransferError,
    VersionMismatch,
)
from .limits import Limits
from .messages import PROTOCOL_VERSION
from .session import Inbound, Session, SessionOptions, handshake
from .tensors import State, StateHeader, TensorSpec, decode_state, encode_state, header_of

__all__ = [
    "Keyring",
    "Secret",
    "AuthenticationFailed",
    "CredentialsError",
    "Channel",
    "ChannelClosed",
    "memory_pair",
    "HandshakeFailed",
    "LimitExceeded",
    "MalformedFrame",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "SessionClosed",
    "StateMismatch",
    "TransferError",
    "VersionMismatch",
    "Limits",
    "PROTOCOL_VERSION",
    "Inbound",
    "Session",
    "SessionOptions",
    "handshake",
    "State",
    "StateHeader",
    "TensorSpec",
    "decode_state",
    "encode_state",
    "header_of",
]
