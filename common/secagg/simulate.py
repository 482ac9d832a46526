"""A secure round with in-process workers: the four stages without a network, for tests, benchmarks and simulation.

:func:`simulate_round` drives one :class:`ServerSecAgg` and a :class:`WorkerSecAgg` per worker exactly as the
round engine does over the wire (requests out, results in, the next stage's requests close the current one), and
drops workers at the stages it is told to. It returns the unmasked sum, the contributors and the transcript: every
payload the coordinator received, in order, which is what a curious coordinator sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from .params import SecAggParams
from .server import ServerSecAgg
from .worker import WorkerSecAgg

__all__ = ["RoundOutcome", "simulate_round"]


@dataclass
class RoundOutcome:
    total: NDArray[np.uint32]
    contributors: list[str]
    transcript: list[tuple[str, BaseModel | bytes]] = field(default_factory=list)  # (sender, payload)


def simulate_round(
    vectors: Mapping[str, NDArray[np.uint32]],
    *,
    params: SecAggParams,
    round: int = 0,
    drop_before: Mapping[str, set[str]] | None = None,
) -> RoundOutcome:
    """Run the four stages; ``drop_before[stage]`` names workers that never answer ``stage`` (and anything later).

    Stages: ``advertise``, ``share_keys``, ``masked_input``, ``unmask``.
    """
    drop = drop_before or {}
    lost: set[str] = set()
    server = ServerSecAgg(round=round, params=params, selected=list(vectors))
    workers = {w: WorkerSecAgg(w, round=round) for w in vectors}
    transcript: list[tuple[str, BaseModel | bytes]] = []

    def alive(stage: str, candidates: list[str]) -> list[str]:
        lost.update(drop.get(stage, set()))
        return [w for w in candidates if w not in lost]

    request = server.advertise_request()
    for w in alive("advertise", server.selected):
        result = workers[w].advertise(request)
        transcript.append((w, result))
        server.receive_advertise(w, result)
    requests = server.share_keys_requests()
    for w in alive("share_keys", sorted(requests)):
        shares = workers[w].share_keys(requests[w])
        transcript.append((w, shares))
        server.receive_shares(w, shares)
    masked_requests = server.masked_input_requests()
    for w in alive("masked_input", sorted(masked_requests)):
        header, packed = workers[w].masked_input(masked_requests[w], vectors[w])
        transcript += [(w, header), (w, packed)]
        server.receive_masked(w, header, packed)
    unmask_requests = server.unmask_requests()
    for w in alive("unmask", sorted(unmask_requests)):
        answer = workers[w].unmask(unmask_requests[w])
        transcript.append((w, answer))
        server.receive_unmask(w, answer)
    total = server.finish()
    return RoundOutcome(total=total, contributors=server.contributors, transcript=transcript)
