"""Every stage payload survives msgpack without ``bin`` (as control frames carry it), and the packed vector a tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError

from fedlink.secagg.errors import ProtocolViolation
from fedlink.secagg.messages import AdvertiseResult, UnmaskRequest
from fedlink.secagg.worker import packed_to_tensor, tensor_to_packed

if TYPE_CHECKING:
    from .conftest import StagedRound


def _through_msgpack(payload: BaseModel) -> BaseModel:
    wire = msgpack.packb(payload.model_dump(mode="json"), use_bin_type=True)
    return type(payload).model_validate(msgpack.unpackb(wire, max_bin_len=0, raw=False))


def test_every_payload_of_a_round_round_trips(staged: Callable[..., StagedRound]) -> None:
    run = staged(n=4)
    seen: list[BaseModel] = [run.server.advertise_request()]
    run.advance()
    seen += list(run.requests.values())
    run.advance()
    seen += list(run.requests.values())
    header, packed = run.workers["w00"].masked_input(run.requests["w00"], run.vectors["w00"])
    seen.append(header)
    run.advance(skip=frozenset({"w00"}))  # w00 already answered above; to the coordinator it is lost
    seen += list(run.requests.values())
    seen.append(run.workers["w01"].unmask(run.requests["w01"]))
    assert {type(p).__name__ for p in seen} >= {"AdvertiseRequest", "ShareKeysRequest", "MaskedInputRequest",
                                                "MaskedInputResult", "UnmaskRequest", "UnmaskResult"}  # fmt: skip
    for payload in seen:
        assert _through_msgpack(payload) == payload
    assert tensor_to_packed(packed_to_tensor(packed)) == packed


def test_malformed_payloads_are_refused() -> None:
    with pytest.raises(ValidationError):
        AdvertiseResult.model_validate({"round": 0, "keys": {"c": "00" * 31, "s": "00" * 32}})
    with pytest.raises(ValidationError):
        UnmaskRequest.model_validate({"round": 0, "session": "00" * 32, "alive": [], "dropped": [], "extra": 1})
    with pytest.raises(ProtocolViolation, match="1-d uint8 tensor"):
        tensor_to_packed(torch.zeros(3, dtype=torch.int64))
    assert packed_to_tensor(np.arange(3, dtype=np.uint8).tobytes()).tolist() == [0, 1, 2]
