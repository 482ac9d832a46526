"""Errors of the wire protocol and the session layer.

::

    ProtocolError
    ├── MalformedFrame        bytes that are not a valid frame or message; the connection survives
    ├── VersionMismatch       the peer speaks another protocol version
    ├── LimitExceeded         a frame, state or tensor is larger than the configured limits
    ├── StateMismatch         a model state's tensor names, shapes or dtypes differ from the expected ones
    ├── HandshakeFailed       the opening exchange did not complete (timeout, wrong role, bad hello, TLS)
    │   └── AuthenticationFailed  a peer did not prove it holds the shared token, or only one side has a token
    ├── CredentialsError      a token or certificate file cannot be used (missing, unreadable, malformed, weak)
    ├── TransferError         a model state transfer broke off or was refused
    ├── RequestTimeout        no reply within the deadline
    ├── RemoteError           the peer answered with an ``error`` message (``code`` says which)
    └── SessionClosed         the connection is gone; pending requests fail with this

Lower-level errors (msgpack, pydantic, websockets) are chained with ``from exc``.
"""

from __future__ import annotations

from fedlink.display import safe
from fedlink.errors import FedlinkError

__all__ = [
    "ProtocolError",
    "MalformedFrame",
    "VersionMismatch",
    "LimitExceeded",
    "StateMismatch",
    "HandshakeFailed",
    "AuthenticationFailed",
    "CredentialsError",
    "TransferError",
    "RequestTimeout",
    "RemoteError",
    "SessionClosed",
]


class ProtocolError(FedlinkError):
    """Base of everything that can go wrong on the wire."""

    code = "protocol_error"


class MalformedFrame(ProtocolError):
    code = "malformed"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class LimitExceeded(ProtocolError):
    code = "limit_exceeded"


class StateMismatch(ProtocolError):
    code = "state_mismatch"


class HandshakeFailed(ProtocolError):
    code = "handshake_failed"


class AuthenticationFailed(HandshakeFailed):
    """The peer could not prove that it holds the token, or one side requires a token and the other has none.

    The message says which side lacks what and how to give it; the connection is closed.
    """

    code = "auth_failed"


class CredentialsError(ProtocolError):
    """A token file, token variable, certificate or key cannot be used; the message names it and the fix.

    Raised while starting up, before any connection: a daemon refuses to start rather than run less safely.
    """

    code = "credentials"


class TransferError(ProtocolError):
    code = "transfer_failed"


class RequestTimeout(ProtocolError):
    code = "timeout"


class RemoteError(ProtocolError):
    """The peer refused or failed a request; ``code`` is its machine-readable reason (e.g. ``busy``)."""

    def __init__(self, code: str, message: str, *, peer: str = "") -> None:
        # The peer's words are data: escaped here, so that whoever logs or shows this error shows them safely.
        self.code = safe(code, limit=64)
        self.remote_message = safe(message, limit=4096)
        self.peer = peer
        where = f" from {peer}" if peer else ""
        super().__init__(f"{self.code}{where}: {self.remote_message}")


class SessionClosed(ProtocolError):
    code = "closed"
