"""A misbehaving worker process for the fault tests: ``python faulty_worker.py MODE [fl-worker options]``.

MODE is ``nan`` (an update with NaN in it), ``shape`` (a tensor of the wrong shape), ``signflip`` (the honest
update sign-flipped around the global model and scaled by 10), ``huge`` (every floating-point value 3e38: finite
float32, with an honest sample count), ``claim`` (honest training, but 10**18 samples claimed in the hello and in
every result), ``topk-index`` (a compressed top-k update whose last index points past its tensor) or ``int8-scale``
(a compressed int8 update with an infinite scale). Everything else is the real ``fl-worker``.
"""

from __future__ import annotations

import sys
import threading

import torch

import fedlink.worker.cli as cli
from fedlink.compression import INDEX_PREFIX, SCALE_PREFIX
from fedlink.protocol.messages import DatasetInfo, TrainRequest, TrainResult
from fedlink.protocol.tensors import State
from fedlink.worker.service import WorkerService


CLAIM = 10**18


class FaultyService(WorkerService):
    mode = "nan"

    def dataset_info(self) -> DatasetInfo:
        info = super().dataset_info()
        return info.model_copy(update={"num_samples": CLAIM}) if self.mode == "claim" else info

    def train(self, request: TrainRequest, state: State, stop: threading.Event | None = None) -> tuple[TrainResult, State]:
        # Training may take the received tensors as the model's own and change them (WorkerService.train): the
        # sign flip needs the global model as it was received.
        received = {k: v.clone() for k, v in state.items()} if self.mode == "signflip" else state
        result, update = super().train(request, state, stop)
        first = next(name for name, t in update.items() if t.is_floating_point())
        if self.mode == "nan":
            update[first] = update[first].clone()
            update[first].view(-1)[0] = float("nan")
        elif self.mode == "shape":
            update[first] = torch.zeros(3, 3)
        elif self.mode == "signflip":
            update = {
                k: (received[k] - 10 * (v - received[k])) if v.is_floating_point() else v for k, v in update.items()
            }
        elif self.mode == "huge":
            update = {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in update.items()}
        elif self.mode == "claim":
            result = result.model_copy(update={"num_samples": CLAIM})
        elif self.mode == "topk-index":
            index = next(name for name in update if name.startswith(INDEX_PREFIX))
            update[index] = update[index].clone()
            update[index][-1] = int(torch.iinfo(update[index].dtype).max)
        elif self.mode == "int8-scale":
            scale = next(name for name in update if name.startswith(SCALE_PREFIX))
            update[scale] = torch.tensor(float("inf"))
        return result, update


if __name__ == "__main__":
    FaultyService.mode = sys.argv[1]
    cli.WorkerService = FaultyService  # type: ignore[misc]  # the test double replaces the service, nothing else
    cli.main(sys.argv[2:])
