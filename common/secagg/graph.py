"""The SecAgg+ neighbour graph: a Harary graph over a permutation of the workers drawn from the session id.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020, section 5 and
appendix: placing the workers on a ring in a random order and linking each to the k/2 nearest on either side
gives a k-regular graph that stays connected among honest survivors with overwhelming probability once k is large
enough (see :mod:`.params`). The order comes from a ChaCha20 stream keyed by HKDF(session id), so every worker
derives the same graph from the session id alone and a coordinator cannot hand-pick anyone's neighbours: a worker
refuses a neighbour list that differs from its own derivation. With k >= n - 1 the graph is complete (SecAgg).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import SecAggConfigError
from .keys import derive
from .prg import keystream

__all__ = ["neighbour_graph", "permutation"]

_LABEL = b"fedlink/secagg/v1/neighbour-graph"


def permutation(ids: Sequence[str], *, session: bytes) -> list[str]:
    """``ids`` (sorted first) in an order that is uniform given the session id (Fisher-Yates, rejection sampling)."""
    order = sorted(ids)
    seed = derive(b"graph", session=session, label=_LABEL)
    stream = keystream(seed, 8 * 4 * max(len(order), 1) + 1024)
    position = 0
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 32) - (1 << 32) % bound  # rejecting draws above the largest multiple keeps it unbiased
        while True:
            if position + 4 > len(stream):
                stream += keystream(derive(stream[-32:], session=session, label=_LABEL), 4096)
            draw = int.from_bytes(stream[position : position + 4], "little")
            position += 4
            if draw < limit:
                break
        j = draw % bound
        order[i], order[j] = order[j], order[i]
    return order


def neighbour_graph(ids: Sequence[str], *, degree: int, session: bytes) -> dict[str, tuple[str, ...]]:
    """Each worker's neighbours (sorted): complete when ``degree >= len(ids) - 1``, else a Harary ring of ``degree``."""
    if len(set(ids)) != len(ids):
        raise SecAggConfigError("worker ids in a secure-aggregation session must be distinct")
    n = len(ids)
    if degree >= n - 1:
        return {worker: tuple(sorted(set(ids) - {worker})) for worker in ids}
    if degree < 2 or degree % 2:
        raise SecAggConfigError(
            f"a sparse neighbour graph needs an even degree of at least 2 (k/2 on each side of the ring), got {degree}"
        )
    ring = permutation(ids, session=session)
    half = degree // 2
    graph: dict[str, tuple[str, ...]] = {}
    for position, worker in enumerate(ring):
        linked = {ring[(position + step) % n] for step in range(-half, half + 1) if step}
        graph[worker] = tuple(sorted(linked))
    return graph
