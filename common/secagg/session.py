"""What every party derives from the advertised keys: the session id, Shamir indices and the neighbour graph.

Worker and coordinator call :func:`derive_session` on the same inputs and must get the same answer; a worker
compares the coordinator's claims (session id, its neighbour list) against its own derivation and refuses any
difference, so the coordinator cannot choose anyone's neighbours or shares' indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ProtocolViolation
from .graph import neighbour_graph
from .keys import session_id
from .messages import PublicKeys
from .params import SecAggParams

__all__ = ["Session", "derive_session", "mask_sign"]


@dataclass(frozen=True)
class Session:
    round: int
    params: SecAggParams
    id: bytes
    keys: dict[str, tuple[bytes, bytes]]  # worker -> (c public, s public)
    index: dict[str, int]  # worker -> Shamir index (1-based rank among the advertised ids)
    graph: dict[str, tuple[str, ...]]

    @property
    def threshold(self) -> int:
        return self.params.threshold


def derive_session(*, round: int, params: SecAggParams, keys: Mapping[str, PublicKeys], stage: str) -> Session:
    """Parse the advertised keys and derive the session; refuses malformed or reused keys, naming the worker."""
    raw: dict[str, tuple[bytes, bytes]] = {}
    seen: dict[bytes, str] = {}
    for worker, pair in keys.items():
        c, s = bytes.fromhex(pair.c), bytes.fromhex(pair.s)
        for key in (c, s):
            if key in seen:
                raise ProtocolViolation(f"public key also advertised by {seen[key]!r}", stage=stage, peer=worker)
            seen[key] = worker
        raw[worker] = (c, s)
    sid = session_id(round=round, params=params.canonical(), keys=raw)
    ids = sorted(raw)
    degree = min(params.neighbours, len(ids) - 1)
    if degree < len(ids) - 1 and degree % 2:
        degree -= 1  # fewer advertised than selected: the ring needs an even degree
    return Session(
        round=round, params=params, id=sid, keys=raw,
        index={worker: rank + 1 for rank, worker in enumerate(ids)},
        graph=neighbour_graph(ids, degree=degree, session=sid),
    )  # fmt: skip


def mask_sign(owner: str, peer: str) -> int:
    """+1 if ``owner`` adds the pairwise mask of the edge to ``peer``, -1 if it subtracts it (ids ordered)."""
    return 1 if owner < peer else -1
