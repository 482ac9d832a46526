"""Unbounded knobs (issue 9, defect 7), against a real ``fl-worker``: a hello asking for heartbeats every 5e-324 s
is refused at the handshake, and a coordinator that never pulls its results makes the worker hold at most
``SessionOptions.max_outbound`` (4) of them, the oldest dropped with a warning. A legitimate job then trains."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedlink.protocol.errors import TransferError
from fedlink.protocol.messages import MIN_HEARTBEAT, ErrorMessage, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.session import SessionOptions

from .hostile import exchange, raw_control
from .test_security import MLP, _certs, _ring, _state, _train, running, session_with

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _certs(tmp_path_factory.mktemp("pki"), "w1,127.0.0.1")


def test_a_hello_with_an_absurd_heartbeat_is_refused(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    absurd = [5e-324, 0.0, -1.0, MIN_HEARTBEAT / 2, 1e9, float("nan")]
    with running(digit_shards[0][0], "--token-file", str(pki / "w1" / "token")) as worker:
        for heartbeat in absurd:
            hello = {"v": 1, "type": "hello", "role": "coordinator", "peer_id": "hasty", "heartbeat": heartbeat,
                     "auth": "hmac-sha256"}
            answers, _ = asyncio.run(exchange(worker.url, [raw_control(hello)]))
            assert [type(a).__name__ for a in answers] == ["Hello", "ErrorMessage"], "its hello, the refusal, no more"
            refusal = answers[1]
            assert isinstance(refusal, ErrorMessage) and refusal.code == "malformed" and "heartbeat" in refusal.message
        asyncio.run(_legitimate(worker.url, pki))
        log = worker.log_path.read_text()
    assert log.count("bad hello") == len(absurd) and "heartbeat" in log


async def _legitimate(url: str, pki: Path) -> None:
    async with session_with(url, keyring=_ring(pki / "coordinator" / "tokens" / "w1.token")) as session:
        await _train(session)


def test_results_never_pulled_are_bounded_per_session(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    held = SessionOptions().max_outbound
    with running(digit_shards[0][0], "--token-file", str(pki / "w1" / "token")) as worker:
        first, last = asyncio.run(_never_pull(worker.url, pki, 2 * held))
        log = worker.log_path.read_text()
    assert "no such state" in first, "the oldest result was dropped"
    assert last == set(_state()), "the newest is still there, and is pulled"
    assert log.count("dropping state") == held, log[-2000:]
    assert f"the most kept is {held}" in log


async def _never_pull(url: str, pki: Path, count: int) -> tuple[str, set[str]]:
    async with session_with(url, keyring=_ring(pki / "coordinator" / "tokens" / "w1.token")) as session:
        answers = []
        for i in range(count):
            request = TrainRequest(round=i, task_id=f"t{i}", model=MLP, plan=TrainingPlan())
            answer = await session.request(request, state=_state(), timeout=60)
            assert isinstance(answer.message, TrainResult) and answer.state_header is not None
            answers.append(answer)  # announced, never pulled
        with pytest.raises(TransferError) as dropped:
            await answers[0].fetch(timeout=30)
        newest = await answers[-1].fetch(timeout=30)
        await _train(session)  # the session itself is fine
        return str(dropped.value), set(newest)
