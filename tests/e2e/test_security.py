"""Security with real ``fl-worker`` processes: tokens, TLS and mutual TLS, the allow-list, limits on connections.

Certificates and tokens come from the real ``fl-coordinator certs`` command. Every worker a test starts is
stopped by the test (SIGTERM to its own PID, then a wait), and must exit with status 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from websockets.asyncio.client import connect

from fedlink.models import mlp
from fedlink.protocol.auth import Keyring, new_token, secret_from_file
from fedlink.protocol.channel import Channel
from fedlink.protocol.errors import AuthenticationFailed, HandshakeFailed, RemoteError
from fedlink.protocol.frames import decode_frame
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import ErrorMessage, Hello, ModelSpec, TrainingPlan, TrainRequest, TrainResult
from fedlink.protocol.session import Session, SessionOptions, handshake
from fedlink.protocol.tls import client_context
from fedlink.protocol.transport import dial
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator
from fedlink.server.errors import NotEnoughWorkers
from fedlink.server.localworkers import LocalWorker, start_worker, worker_command

from .conftest import coordinator_command

pytestmark = pytest.mark.timeout(240)

LIMITS = Limits()
HELLO = Hello(role="coordinator", peer_id="security-test")
MLP = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": 16, "num_classes": 10})
QUIET = SessionOptions(heartbeat_interval=0)
WAIT = 20.0


def _certs(out: Path, *hosts: str) -> Path:
    done = subprocess.run(
        [*coordinator_command(), "certs", "--out", str(out), *(a for h in hosts for a in ("--host", h)), "--tokens"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA, w1 and w2 (both 127.0.0.1) and the coordinator, with a token per worker."""
    return _certs(tmp_path_factory.mktemp("pki"), "w1,127.0.0.1", "w2,127.0.0.1")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA issuing the same names."""
    return _certs(tmp_path_factory.mktemp("stranger"), "w1,127.0.0.1")


def _tls_args(pki: Path, host: str, *, mutual: bool = True) -> list[str]:
    folder = pki / host
    args = ["--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem")]
    return args + (["--tls-ca", str(folder / "ca.pem")] if mutual else [])


def _coordinator_tls(pki: Path, *, client_cert: bool = True) -> Any:
    folder = pki / "coordinator"
    if not client_cert:
        return client_context(ca=folder / "ca.pem")
    return client_context(ca=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem")


def _ring(path: Path) -> Keyring:
    return Keyring(shared=secret_from_file(path))


@contextmanager
def running(shard: Path, *args: str, env: dict[str, str] | None = None, worker_id: str = "w") -> Iterator[LocalWorker]:
    worker = start_worker(shard, worker_id=worker_id, extra_args=["--threads", "1", *args], env=env)
    try:
        yield worker
    finally:
        status = worker.stop()
    assert status == 0, f"worker did not stop cleanly:\n{worker.log_tail()}"


class Recording:
    """A channel that keeps a copy of every frame it sends: what an eavesdropper records."""

    def __init__(self, inner: Channel) -> None:
        self.inner, self.peer = inner, inner.peer
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        await self.inner.send(data)

    async def recv(self) -> bytes | str:
        return await self.inner.recv()

    async def close(self, reason: str = "") -> None:
        await self.inner.close(reason)


@asynccontextmanager
async def session_with(
    url: str, *, keyring: Keyring | None = None, ssl_context: Any = None, record: list[bytes] | None = None
) -> AsyncIterator[Session]:
    channel: Any = await dial(url, limits=LIMITS, timeout=WAIT, ssl_context=ssl_context)
    if record is not None:
        channel = Recording(channel)
    try:
        peer = await handshake(channel, HELLO, limits=LIMITS, timeout=WAIT, keyring=keyring, initiator=True)
    except BaseException:
        await channel.close("refused")
        raise
    finally:
        if record is not None:
            record.extend(channel.sent)
    session = Session(channel, peer=peer, limits=LIMITS, options=QUIET)
    session.start()
    try:
        yield session
    finally:
        await session.close("done")


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(mlp(in_features=64, hidden=16, num_classes=10).state_dict())


async def _train(session: Session) -> None:
    answer = await session.request(TrainRequest(round=1, task_id="t", model=MLP, plan=TrainingPlan()), state=_state(), timeout=60)
    assert isinstance(answer.message, TrainResult)
    assert (await answer.fetch(timeout=30)).keys() == _state().keys()


async def _replay(url: str, frames: Sequence[bytes]) -> list[object]:
    """Send recorded frames on a fresh connection, as an attacker would; returns what the worker answered."""
    answers: list[object] = []
    async with connect(url, subprotocols=["fedlink.v1"]) as ws:  # type: ignore[list-item]
        for frame in frames:
            await ws.send(frame)
        try:
            while True:
                answers.append(decode_frame(await asyncio.wait_for(ws.recv(), WAIT), LIMITS))
        except Exception:  # noqa: BLE001 - the worker hangs up: that is the point
            pass
    return answers


# -- tokens ---------------------------------------------------------------------------------------------------------


def test_token_worker_refuses_no_token_a_wrong_token_and_a_replayed_handshake(
    digit_shards: tuple[list[Path], Path], pki: Path, stranger: Path
) -> None:
    with running(digit_shards[0][0], "--token-file", str(pki / "w1" / "token")) as worker:
        asyncio.run(_token_checks(worker.url, pki, stranger))
        assert worker.process.poll() is None, "the worker is still up"
        # The worker logs a refusal just after it hangs up: wait for the second one.
        asyncio.run(_log_shows(worker, "did not prove that it holds the token", count=2))
        log = worker.log_path.read_text()
    assert "has no token, but this worker requires one" in log
    assert log.count("did not prove that it holds the token") == 2, "the wrong token and the replay"
    assert "Traceback" not in log


async def _token_checks(url: str, pki: Path, stranger: Path) -> None:
    with pytest.raises(AuthenticationFailed, match="requires a token, this coordinator has none"):
        async with session_with(url):
            pass
    with pytest.raises(AuthenticationFailed, match="refused us: authentication failed"):
        async with session_with(url, keyring=_ring(stranger / "w1" / "token")):
            pass
    recorded: list[bytes] = []
    async with session_with(url, keyring=_ring(pki / "coordinator" / "tokens" / "w1.token"), record=recorded) as session:
        await _train(session)
    handshake_frames = recorded[:3]
    answers = await _replay(url, handshake_frames)
    assert not any(type(a).__name__ == "AuthProof" for a in answers), "the worker proves nothing to a replayer"
    refusal = answers[-1]
    assert isinstance(refusal, ErrorMessage) and refusal.code == "auth_failed"


def test_token_from_the_environment_and_a_clear_mismatch_on_both_sides(
    digit_shards: tuple[list[Path], Path], pki: Path, tmp_path: Path
) -> None:
    token = (pki / "w1" / "token").read_text().strip()
    with running(digit_shards[0][0], env={"FEDLINK_TOKEN": token}) as worker:
        config = _config([worker.url], tmp_path / "open", rounds=1, timeouts={"wait_for_workers": 3})
        with pytest.raises(NotEnoughWorkers, match="requires a token, this coordinator has none.*auth.token_file"):
            asyncio.run(asyncio.wait_for(Coordinator(config).run(), 60))
        config = _config([{"url": worker.url, "token_file": str(pki / "coordinator" / "tokens" / "w1.token")}],
                         tmp_path / "ok", rounds=1)
        history = asyncio.run(asyncio.wait_for(Coordinator(config).run(), 120))
        log = worker.log_path.read_text()
    assert history[-1]["workers"] == 1
    assert "coordinator 'security-job'" in log and "has no token, but this worker requires one" in log
    assert token not in log


def test_both_token_sources_at_once_are_refused(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    done = subprocess.run(
        [*worker_command(), "--data", str(digit_shards[0][0]), "--port", "0", "--token-file", str(pki / "w1" / "token")],
        env={**os.environ, "FEDLINK_TOKEN": new_token()}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and done.stdout == "" and "not both" in done.stderr


def test_open_worker_warns_loudly_and_listens_on_loopback(digit_shards: tuple[list[Path], Path]) -> None:
    process = subprocess.Popen(
        [*worker_command(), "--data", str(digit_shards[0][0]), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "FEDLINK_TOKEN"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("fedlink worker listening on ws://127.0.0.1:"), line
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "this worker is OPEN" in err and "--token-file" in err and "listens on loopback only" in err


# -- TLS ------------------------------------------------------------------------------------------------------------


def test_tls_worker_refuses_plain_ws_a_wrong_ca_and_a_missing_client_certificate(
    digit_shards: tuple[list[Path], Path], pki: Path, stranger: Path
) -> None:
    token = pki / "w1" / "token"
    with running(digit_shards[0][0], "--token-file", str(token), *_tls_args(pki, "w1")) as worker:
        assert worker.url.startswith("wss://127.0.0.1:")
        asyncio.run(_tls_checks(worker.url, pki, stranger))
        assert worker.process.poll() is None


async def _tls_checks(url: str, pki: Path, stranger: Path) -> None:
    ring = _ring(pki / "coordinator" / "tokens" / "w1.token")
    with pytest.raises(HandshakeFailed, match="dial wss://"):
        async with session_with(url.replace("wss://", "ws://"), keyring=ring):
            pass
    with pytest.raises(HandshakeFailed, match="not trusted"):
        async with session_with(url, keyring=ring, ssl_context=client_context(ca=stranger / "ca" / "ca.pem")):
            pass
    with pytest.raises(HandshakeFailed, match="client certificate"):
        async with session_with(url, keyring=ring, ssl_context=_coordinator_tls(pki, client_cert=False)):
            pass
    foreign = client_context(
        ca=pki / "ca" / "ca.pem", cert=stranger / "coordinator" / "cert.pem", key=stranger / "coordinator" / "key.pem"
    )
    with pytest.raises(HandshakeFailed):
        async with session_with(url, keyring=ring, ssl_context=foreign):
            pass
    async with session_with(url, keyring=ring, ssl_context=_coordinator_tls(pki)) as session:
        await _train(session)


def _config(workers: list[Any], out: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "name": "security-job",
        "seed": 3,
        "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}},
        "workers": workers,
        "rounds": 2,
        "sampling": {"min_workers": max(1, len(workers))},
        "training": {"epochs": 1, "batch_size": 32},
        "timeouts": {"round": 60, "connect": 10, "wait_for_workers": 30, "heartbeat": 1.0, "reconnect_max": 0.5},
        "output": str(out),
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return parse_config(base)


def test_a_job_over_mutual_tls_with_a_token_per_worker(
    digit_shards: tuple[list[Path], Path], pki: Path, tmp_path: Path
) -> None:
    shards = digit_shards[0]
    tokens = pki / "coordinator" / "tokens"
    with running(shards[0], "--token-file", str(pki / "w1" / "token"), *_tls_args(pki, "w1"), worker_id="w1") as w1, \
            running(shards[1], "--token-file", str(pki / "w2" / "token"), *_tls_args(pki, "w2"), worker_id="w2") as w2:
        coordinator = pki / "coordinator"
        tls = {"ca": str(coordinator / "ca.pem"), "cert": str(coordinator / "cert.pem"), "key": str(coordinator / "key.pem")}
        workers = [{"url": w1.url, "token_file": str(tokens / "w1.token")}, {"url": w2.url, "token_file": str(tokens / "w2.token")}]
        history = asyncio.run(asyncio.wait_for(Coordinator(_config(workers, tmp_path / "run", tls=tls)).run(), 120))
        swapped = [{"url": w1.url, "token_file": str(tokens / "w2.token")}, {"url": w2.url, "token_file": str(tokens / "w1.token")}]
        config = _config(swapped, tmp_path / "swapped", tls=tls, timeouts={"wait_for_workers": 3})
        with pytest.raises(NotEnoughWorkers, match="refused us: authentication failed.*same token"):
            asyncio.run(asyncio.wait_for(Coordinator(config).run(), 60))
    assert [h["workers"] for h in history] == [2, 2]


def test_dial_in_over_tls_with_per_worker_tokens(digit_shards: tuple[list[Path], Path], pki: Path, tmp_path: Path) -> None:
    """A worker behind NAT dials a wss:// listener that requires client certificates and its own token; an
    impostor with a valid certificate but not that worker's token, claiming its id, never gets a session."""
    shards = digit_shards[0]
    coordinator_dir = pki / "coordinator"
    tls = {"ca": str(coordinator_dir / "ca.pem"), "cert": str(coordinator_dir / "cert.pem"),
           "key": str(coordinator_dir / "key.pem"), "require_client_cert": True}
    config = _config(
        [], tmp_path / "run", rounds=3, sampling={"min_workers": 1}, listen={"host": "127.0.0.1", "port": 0},
        tls=tls, auth={"workers": {"nat-1": str(coordinator_dir / "tokens" / "w1.token")}},
    )
    impostor, genuine = asyncio.run(asyncio.wait_for(_dial_in(config, shards, pki), 180))
    assert "coordinator 'security-job' connected" not in impostor, "the impostor never got a session"
    assert "refused us: authentication failed" in impostor
    assert "coordinator 'security-job' connected" in genuine and "replaced" not in genuine


def _connect_args(url: str, folder: Path) -> list[str]:
    return [
        "--threads", "1", "--connect", url, "--token-file", str(folder / "token"), "--tls-cert", str(folder / "cert.pem"),
        "--tls-key", str(folder / "key.pem"), "--tls-ca", str(folder / "ca.pem"),
    ]


async def _log_shows(worker: LocalWorker, text: str, timeout: float = 30.0, *, count: int = 1) -> None:
    async with asyncio.timeout(timeout):
        while worker.log_path.read_text().count(text) < count:
            await asyncio.sleep(0.1)


async def _dial_in(config: Any, shards: list[Path], pki: Path) -> tuple[str, str]:
    coordinator = Coordinator(config)
    run = asyncio.ensure_future(coordinator.run())
    started: list[LocalWorker] = []
    try:
        await asyncio.wait_for(coordinator.listening.wait(), 30)
        assert coordinator.listen_url is not None and coordinator.listen_url.startswith("wss://127.0.0.1:")
        url = coordinator.listen_url.replace("127.0.0.1", "localhost")  # the name the coordinator's certificate lists
        # The impostor (w2's certificate and token, nat-1's name) comes first: no round can start without a worker.
        started.append(await asyncio.to_thread(start_worker, shards[1], worker_id="nat-1", extra_args=_connect_args(url, pki / "w2")))
        await _log_shows(started[0], "refused us")
        started.append(await asyncio.to_thread(start_worker, shards[0], worker_id="nat-1", extra_args=_connect_args(url, pki / "w1")))
        history = await asyncio.wait_for(run, 120)
        assert [h["workers"] for h in history] == [1, 1, 1]
    finally:
        run.cancel()
        for worker in started:
            worker.stop()
    assert all(w.process.returncode == 0 for w in started)
    return started[0].log_path.read_text(), started[1].log_path.read_text()


# -- what a worker runs, and what it holds --------------------------------------------------------------------------


def test_disallowed_factory_is_refused_logged_and_never_imported(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    marker = tmp_path / "imported"
    (modules / "evil_fedlink_models.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "import torch\ndef model():\n    return torch.nn.Linear(64, 10)\n"
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH", "")]))}
    spec = ModelSpec(factory="evil_fedlink_models:model")
    state = {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}
    with running(digit_shards[0][0], env=env) as worker:
        refused = asyncio.run(_request_model(worker.url, spec, state))
        log = worker.log_path.read_text()
    assert isinstance(refused, RemoteError) and refused.code == "model_not_allowed"
    assert "evil_fedlink_models:model" in log and "not allowed" in log, "the refusal is logged"
    assert not marker.exists(), "the module was never imported"
    # The same module, allowed by its operator, is imported: so the marker would have shown an import.
    with running(digit_shards[0][0], "--allow-model", "evil_fedlink_models:*", env=env) as worker:
        answer = asyncio.run(_request_model(worker.url, spec, state))
    assert isinstance(answer, TrainResult) and marker.exists()


async def _request_model(url: str, spec: ModelSpec, state: dict[str, torch.Tensor]) -> object:
    async with session_with(url) as session:
        try:
            answer = await session.request(TrainRequest(round=1, task_id="t", model=spec, plan=TrainingPlan()), state=state, timeout=60)
        except RemoteError as exc:
            return exc
        await answer.discard()
        return answer.message


def test_a_state_that_does_not_fit_the_model_is_refused_before_it_moves(digit_shards: tuple[list[Path], Path]) -> None:
    good = _state()
    name = next(iter(good))
    variants = {
        "dtype": {**good, name: good[name].double()},
        "extra": {**good, "sneaky.buffer": torch.zeros(1 << 16)},
        "missing": {k: v for k, v in good.items() if k != name},
        "name": {("renamed" if k == name else k): v for k, v in good.items()},
    }
    with running(digit_shards[0][0]) as worker:
        asyncio.run(_mismatches(worker.url, variants))


async def _mismatches(url: str, variants: dict[str, dict[str, torch.Tensor]]) -> None:
    async with session_with(url) as session:
        for what, state in variants.items():
            before = session.counters.bytes_out
            with pytest.raises(RemoteError) as refused:
                await session.request(TrainRequest(round=1, task_id=what, model=MLP, plan=TrainingPlan()), state=state, timeout=60)
            assert refused.value.code == "state_mismatch", what
            assert session.counters.bytes_out - before < 16 * 1024, f"{what}: the refused state never moved"
        await _train(session)


def test_connection_cap_and_handshake_time_limit_on_a_worker(digit_shards: tuple[list[Path], Path], pki: Path) -> None:
    args = ["--max-connections", "2", "--handshake-timeout", "1", "--token-file", str(pki / "w1" / "token")]
    with running(digit_shards[0][0], *args) as worker:
        port = int(worker.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            asyncio.run(_cap_checks(worker.url, pki, idle))
        finally:
            for sock in idle:
                sock.close()
        log = worker.log_path.read_text()
    assert "limit is 2 (max_connections)" in log


async def _cap_checks(url: str, pki: Path, idle: list[socket.socket]) -> None:
    await asyncio.sleep(0.3)  # both idle connections are in
    with pytest.raises(HandshakeFailed, match="503"):
        await dial(url, limits=LIMITS, timeout=WAIT)
    # Half-open connections are closed once the handshake time is up: then a real coordinator gets in.
    for sock in idle:
        sock.settimeout(10)
        assert await asyncio.to_thread(sock.recv, 1) == b"", "the worker closed the silent connection"
    async with session_with(url, keyring=_ring(pki / "coordinator" / "tokens" / "w1.token")) as session:
        await _train(session)
