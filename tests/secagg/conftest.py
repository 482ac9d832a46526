"""A round driven stage by stage, so that tests can alter any request before a worker sees it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedlink.secagg.params import SecAggParams, resolve_params
from fedlink.secagg.server import ServerSecAgg
from fedlink.secagg.worker import WorkerSecAgg


@dataclass
class StagedRound:
    """Server, workers and the requests of the stage reached; ``advance()`` runs one more stage for everyone."""

    params: SecAggParams
    server: ServerSecAgg
    workers: dict[str, WorkerSecAgg]
    vectors: dict[str, NDArray[np.uint32]]
    requests: dict[str, Any] = field(default_factory=dict)
    stage: str = "advertise"

    def advance(self, *, skip: frozenset[str] = frozenset()) -> None:
        """Answer the current stage's requests (workers in ``skip`` stay silent) and make the next stage's."""
        server, workers = self.server, self.workers
        if self.stage == "advertise":
            for w in server.selected:
                if w not in skip:
                    server.receive_advertise(w, workers[w].advertise(server.advertise_request()))
            self.requests, self.stage = server.share_keys_requests(), "share_keys"
        elif self.stage == "share_keys":
            for w, request in self.requests.items():
                if w not in skip:
                    server.receive_shares(w, workers[w].share_keys(request))
            self.requests, self.stage = server.masked_input_requests(), "masked_input"
        elif self.stage == "masked_input":
            for w, request in self.requests.items():
                if w not in skip:
                    server.receive_masked(w, *workers[w].masked_input(request, self.vectors[w]))
            self.requests, self.stage = server.unmask_requests(), "unmask"
        else:
            raise AssertionError(f"nothing to advance after {self.stage}")


def make_round(n: int = 5, *, length: int = 16, bits: int = 16, seed: int = 0, **overrides: Any) -> StagedRound:
    params = resolve_params(num_selected=n, length=length, bits=bits, **overrides)
    ids = [f"w{i:02d}" for i in range(n)]
    rng = np.random.default_rng(seed)  # test inputs only, not secrets
    vectors = {w: rng.integers(0, 1 << bits, length, dtype=np.uint32) for w in ids}
    return StagedRound(
        params=params,
        server=ServerSecAgg(round=3, params=params, selected=ids),
        workers={w: WorkerSecAgg(w, round=3) for w in ids},
        vectors=vectors,
    )


@pytest.fixture
def staged() -> Callable[..., StagedRound]:
    return make_round
