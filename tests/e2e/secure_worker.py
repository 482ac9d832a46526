"""An instrumented worker for the secure-aggregation tests: ``python secure_worker.py [fl-worker options]``.

The real ``fl-worker``, plus two things only a test may do: with ``$FEDLINK_TEST_VECTORS`` set, each round's
quantised (unmasked) vector is written to ``DIR/ID-rROUND.npy`` just before masking, so the test can check the
coordinator's unmasked sum against the plain sum of the survivors' vectors; with ``$FEDLINK_TEST_DIE_AT`` set to
``masked_input`` or ``unmask``, the process SIGKILLs itself when that stage's request arrives (lost before masking,
or after its masked input went out).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

import fedlink.secagg.worker as secagg_worker
import fedlink.worker.cli as cli

_masked = secagg_worker.WorkerSecAgg.masked_input
_unmask = secagg_worker.WorkerSecAgg.unmask
DIE_AT = os.environ.get("FEDLINK_TEST_DIE_AT", "")
VECTORS = os.environ.get("FEDLINK_TEST_VECTORS")


def masked_input(self: Any, request: Any, vector: Any) -> Any:
    if DIE_AT == "masked_input":
        os.kill(os.getpid(), signal.SIGKILL)
    if VECTORS:
        np.save(Path(VECTORS) / f"{self.worker_id}-r{self.round}.npy", vector, allow_pickle=False)
    return _masked(self, request, vector)


def unmask(self: Any, request: Any) -> Any:
    if DIE_AT == "unmask":
        os.kill(os.getpid(), signal.SIGKILL)
    return _unmask(self, request)


secagg_worker.WorkerSecAgg.masked_input = masked_input  # type: ignore[method-assign]
secagg_worker.WorkerSecAgg.unmask = unmask  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "fl-worker"
    cli.main()
