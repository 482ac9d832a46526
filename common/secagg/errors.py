"""Errors of secure aggregation.

::

    SecAggError                      (fedlink.errors.FedlinkError)
    ├── SecAggConfigError            parameters that cannot be both private and correct (overflow, threshold, k)
    ├── ShareError                   Shamir shares that cannot rebuild a secret (too few, duplicate or zero index)
    ├── ProtocolViolation            a message breaks the protocol; the receiver refuses it and keeps its secrets
    │   └── ShareDecryptionFailed    an encrypted share does not authenticate under its (session, sender, recipient)
    ├── TooFewSurvivors              not enough workers are left to finish the round; nothing is released
    ├── ReconstructionFailed         rebuilt shares disagree with the key a worker advertised
    └── InvalidUpdate                an update that cannot be quantised (wrong tensors, shapes, NaN or inf)

Every message names the stage and, where there is one, the peer, so that an operator can tell which worker
(or the coordinator) misbehaved or dropped. ``stage`` and ``peer`` are also attributes for programs.
"""

from __future__ import annotations

from fedlink.errors import FedlinkError

__all__ = [
    "SecAggError",
    "SecAggConfigError",
    "ShareError",
    "ProtocolViolation",
    "ShareDecryptionFailed",
    "TooFewSurvivors",
    "ReconstructionFailed",
    "InvalidUpdate",
]


class SecAggError(FedlinkError):
    """Base of every secure-aggregation error; ``stage`` and ``peer`` say where, when known."""

    code = "secagg_error"

    def __init__(self, message: str, *, stage: str | None = None, peer: str | None = None) -> None:
        where = ", ".join(part for part in (stage and f"stage {stage}", peer and f"peer {peer!r}") if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.stage = stage
        self.peer = peer


class SecAggConfigError(SecAggError):
    """The parameters cannot work: the message names the value and the range it must lie in."""

    code = "secagg_config"


class ShareError(SecAggError):
    code = "secagg_shares"


class ProtocolViolation(SecAggError):
    """A message contradicts the protocol or an earlier message; the receiver refuses it and reveals nothing."""

    code = "secagg_violation"


class ShareDecryptionFailed(ProtocolViolation):
    code = "secagg_decrypt"


class TooFewSurvivors(SecAggError):
    """Fewer workers are left than the threshold or ``min_survivors`` allow; ``dropped`` maps stage to ids."""

    code = "secagg_too_few"

    def __init__(self, message: str, *, stage: str, dropped: dict[str, list[str]]) -> None:
        lost = "; ".join(f"lost at {name}: {', '.join(ids)}" for name, ids in dropped.items() if ids)
        super().__init__(f"{message}{'; ' + lost if lost else ''}", stage=stage)
        self.dropped = dropped


class ReconstructionFailed(SecAggError):
    code = "secagg_rebuild"


class InvalidUpdate(SecAggError):
    code = "secagg_update"
