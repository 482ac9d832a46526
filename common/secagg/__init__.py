"""Secure aggregation: the coordinator learns the sum of the workers' updates and nothing per worker.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (double masking,
dropout recovery) with the neighbour graph of Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020. Everything here is pure (no sockets, no asyncio): :class:`WorkerSecAgg` and
:class:`ServerSecAgg` are the two sides' state machines over the four stages (advertise keys, share keys, masked
input, unmask); the round engine carries their payloads (:mod:`.messages`). The pieces:

* :mod:`.params` resolves and checks neighbours, threshold, colluding and min_survivors;
* :mod:`.quantize` turns an update (plus its sample weight and metrics) into a vector mod 2^bits and back;
* :mod:`.keys`, :mod:`.shamir`, :mod:`.prg`, :mod:`.graph`, :mod:`.bitpack` are the primitives;
* :mod:`.simulate` runs a whole round in memory (tests, benchmarks, simulation).
"""

from __future__ import annotations

from .errors import (
    InvalidUpdate, ProtocolViolation, ReconstructionFailed, SecAggConfigError, SecAggError, ShareDecryptionFailed,
    ShareError, TooFewSurvivors,
)  # fmt: skip
from .messages import (
    AdvertiseRequest, AdvertiseResult, MaskedInputRequest, MaskedInputResult, PublicKeys, ShareKeysRequest,
    ShareKeysResult, UnmaskRequest, UnmaskResult,
)  # fmt: skip
from .params import SecAggParams, resolve_params
from .quantize import Aggregate, QuantSpec, VectorLayout, decode_sum, encode_update, layout_of
from .server import ServerSecAgg
from .simulate import RoundOutcome, simulate_round
from .worker import WorkerSecAgg, packed_to_tensor, tensor_to_packed

__all__ = [
    "SecAggError",
    "SecAggConfigError",
    "ShareError",
    "ProtocolViolation",
    "ShareDecryptionFailed",
    "TooFewSurvivors",
    "ReconstructionFailed",
    "InvalidUpdate",
    "PublicKeys",
    "AdvertiseRequest",
    "AdvertiseResult",
    "ShareKeysRequest",
    "ShareKeysResult",
    "MaskedInputRequest",
    "MaskedInputResult",
    "UnmaskRequest",
    "UnmaskResult",
    "SecAggParams",
    "resolve_params",
    "VectorLayout",
    "QuantSpec",
    "Aggregate",
    "layout_of",
    "encode_update",
    "decode_sum",
    "WorkerSecAgg",
    "ServerSecAgg",
    "packed_to_tensor",
    "tensor_to_packed",
    "RoundOutcome",
    "simulate_round",
]
