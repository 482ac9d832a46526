"""Payloads of the four secure-aggregation stages, one pydantic model per request and result.

Everything is msgpack-friendly without ``bin``: bytes travel as lowercase hex, ids as strings, counts as ints. The
one large payload, a worker's packed masked vector, is not in these models: it travels as a state (one ``uint8``
tensor, see :func:`fedlink.secagg.worker.packed_to_tensor`) announced by :class:`MaskedInputResult`.

Stage by stage (coordinator -> worker request, worker -> coordinator result):

1. advertise: :class:`AdvertiseRequest` -> :class:`AdvertiseResult` (two public keys)
2. share keys: :class:`ShareKeysRequest` (everyone's keys, the neighbour list) -> :class:`ShareKeysResult`
   (an encrypted share bundle per neighbour)
3. masked input: :class:`MaskedInputRequest` (the bundles addressed to this worker) -> :class:`MaskedInputResult`
4. unmask: :class:`UnmaskRequest` (who survived, who dropped) -> :class:`UnmaskResult` (one share per neighbour)

No result carries a sample count, a metric or an unmasked value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .params import SecAggParams

__all__ = [
    "PublicKeys",
    "AdvertiseRequest",
    "AdvertiseResult",
    "ShareKeysRequest",
    "ShareKeysResult",
    "MaskedInputRequest",
    "MaskedInputResult",
    "UnmaskRequest",
    "UnmaskResult",
]

_HEX32 = r"^[0-9a-f]{64}$"
_HEX = r"^([0-9a-f]{2})*$"
_Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
_Hex = Annotated[str, StringConstraints(pattern=_HEX, max_length=1024)]
_MAX_PEERS = 100_000


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0, lt=1 << 63)


class _InSession(_Payload):
    session: str = Field(pattern=_HEX32, description="the session id every worker derived (hex)")


class PublicKeys(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    c: str = Field(pattern=_HEX32, description="X25519 key whose agreements encrypt shares")
    s: str = Field(pattern=_HEX32, description="X25519 key whose agreements seed pairwise masks")


class AdvertiseRequest(_Payload):
    type: Literal["secagg_advertise"] = "secagg_advertise"
    params: SecAggParams
    selected: list[_Id] = Field(min_length=3, max_length=_MAX_PEERS)


class AdvertiseResult(_Payload):
    type: Literal["secagg_advertise_result"] = "secagg_advertise_result"
    keys: PublicKeys


class ShareKeysRequest(_InSession):
    type: Literal["secagg_share_keys"] = "secagg_share_keys"
    params: SecAggParams
    keys: dict[_Id, PublicKeys] = Field(max_length=_MAX_PEERS, description="every worker that advertised")
    neighbours: list[_Id] = Field(max_length=_MAX_PEERS, description="the recipient's neighbours, as the coordinator sees them")


class ShareKeysResult(_InSession):
    type: Literal["secagg_share_keys_result"] = "secagg_share_keys_result"
    shares: dict[_Id, _Hex] = Field(max_length=_MAX_PEERS, description="neighbour id -> encrypted share bundle (hex)")


class MaskedInputRequest(_InSession):
    type: Literal["secagg_masked_input"] = "secagg_masked_input"
    senders: list[_Id] = Field(max_length=_MAX_PEERS, description="every worker whose share bundles were relayed")
    shares: dict[_Id, _Hex] = Field(max_length=_MAX_PEERS, description="sender id -> bundle addressed to the recipient")


class MaskedInputResult(_InSession):
    """Announces the packed masked vector (``length`` values of ``bits`` bits), which follows as a state."""

    type: Literal["secagg_masked_input_result"] = "secagg_masked_input_result"
    length: int = Field(ge=1)
    bits: int = Field(ge=1, le=32)


class UnmaskRequest(_InSession):
    type: Literal["secagg_unmask"] = "secagg_unmask"
    alive: list[_Id] = Field(max_length=_MAX_PEERS, description="workers whose masked input arrived")
    dropped: list[_Id] = Field(max_length=_MAX_PEERS, description="workers that shared keys but sent no masked input")


class UnmaskResult(_InSession):
    type: Literal["secagg_unmask_result"] = "secagg_unmask_result"
    self_mask_shares: dict[_Id, _Hex] = Field(max_length=_MAX_PEERS, description="alive neighbour -> share of its self-mask seed")
    key_shares: dict[_Id, _Hex] = Field(max_length=_MAX_PEERS, description="dropped neighbour -> share of its mask key")
