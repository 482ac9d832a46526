"""A hostile coordinator process for the hardening tests: ``python curious_coordinator.py MODE URL [TOKEN_FILE]``.

It holds the worker's token (when one is given) and speaks the real protocol; it prints one JSON line on stdout.

- ``extract``: the sample-extraction attack. A linear model, ``batch_size: 1``, one step, ``update: delta``,
  learning rate 1: for any class row ``k`` touched by the step, ``ΔW[k] / Δb[k]`` is the training sample. Prints
  ``{"refused": code, "message": ...}`` or ``{"x": [...]}``, the recovered sample.
- ``hangup``: sends a long training job, waits until its weights have left, and exits at once without a word
  (``os._exit``), as a coordinator that crashes or hangs up mid-job. Prints ``{"sent": true}`` first, or
  ``{"refused": code}`` when the worker was busy.
- ``deep``: a ~100-byte request for ``fedlink.models:mlp`` with ``depth: 100000``; prints how it was answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fedlink.models import mlp
from fedlink.protocol.auth import Keyring, secret_from_file
from fedlink.protocol.errors import RemoteError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello, ModelSpec, OptimizerSpec, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.session import Session, SessionOptions
from fedlink.server.remote import RemoteWorker

LINEAR = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "num_classes": 10, "depth": 0})
SMALL = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})


async def _session(url: str, token_file: str | None) -> Session:
    keyring = Keyring(shared=secret_from_file(Path(token_file))) if token_file else None
    remote = RemoteWorker(url, keyring=keyring)
    ok = await remote.connect(
        hello=Hello(role="coordinator", peer_id="curious"), limits=Limits(), timeout=30, options=SessionOptions()
    )
    if not ok or remote.session is None:
        raise SystemExit(f"cannot connect to {url}: {remote.last_error}")
    return remote.session


def _state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        model = mlp(**spec.kwargs)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


async def extract(url: str, token_file: str | None) -> dict[str, Any]:
    session = await _session(url, token_file)
    state = _state(LINEAR)
    plan = TrainingPlan(epochs=1, batch_size=1, max_steps=1, update="delta", optimizer=OptimizerSpec(lr=1.0))
    try:
        inbound = await session.request(
            TrainRequest(round=1, task_id="peek", model=LINEAR, plan=plan), state=state, timeout=60
        )
    except RemoteError as exc:
        return {"refused": exc.code, "message": str(exc)}
    assert isinstance(inbound.message, TrainResult)
    delta = await inbound.fetch(timeout=60)
    weight, bias = delta["1.weight"].double(), delta["1.bias"].double()
    k = int(bias.abs().argmax())
    await session.close("done")
    return {"x": (weight[k] / bias[k]).tolist()}


async def hangup(url: str, token_file: str | None) -> None:
    session = await _session(url, token_file)
    state = _state(SMALL)
    job = TrainRequest(round=1, task_id="orphan", model=SMALL, plan=TrainingPlan(epochs=10_000, batch_size=16))
    pending = asyncio.ensure_future(session.request(job, state=state, timeout=600))
    size = sum(t.nbytes for t in state.values())
    while session.counters.bytes_out < size and not pending.done():
        await asyncio.sleep(0.01)
    if pending.done():
        exc = pending.exception()
        print(json.dumps({"refused": getattr(exc, "code", repr(exc))}), flush=True)
        os._exit(0)
    print(json.dumps({"sent": True}), flush=True)
    os._exit(0)  # no Bye, no close: the connection just drops


async def deep(url: str, token_file: str | None) -> dict[str, Any]:
    session = await _session(url, token_file)
    spec = ModelSpec(factory="fedlink.models:mlp", kwargs={"depth": 100_000})
    state = _state(SMALL)  # announced only: a model this deep is refused before any state moves
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await session.request(TrainRequest(round=1, task_id="deep", model=spec, plan=TrainingPlan()), state=state, timeout=600)
    except RemoteError as exc:
        return {"refused": exc.code, "message": str(exc), "seconds": loop.time() - started}
    return {"refused": None, "seconds": loop.time() - started}


def main(argv: list[str]) -> None:
    mode, url, token = argv[0], argv[1], (argv[2] if len(argv) > 2 else None)
    if mode == "hangup":
        asyncio.run(hangup(url, token))
        return
    result = asyncio.run({"extract": extract, "deep": deep}[mode](url, token))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
