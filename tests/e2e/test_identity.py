"""Identity and credentials (issue 9, defect 8), with real processes: the coordinator's listener answers an
unknown id exactly like a known one until the proof fails; weak tokens and token files open to other users stop
``fl-worker`` and ``fl-coordinator`` at start with the fix to apply; and certificates from ``fl-coordinator certs``
carry roles both sides check, so one worker's certificate cannot open another worker. Each time, the legitimate
job then runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from fedlink.protocol.auth import new_token
from fedlink.protocol.errors import HandshakeFailed
from fedlink.protocol.messages import AuthChallenge, AuthProof, ErrorMessage
from fedlink.protocol.tls import client_context
from fedlink.server.localworkers import start_worker, worker_command

from .conftest import coordinator_command
from .hostile import CoordinatorProcess, exchange, job_config, raw_control
from .test_security import _certs, _ring, _tls_args, _train, running, session_with

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """w1 and w2 on 127.0.0.1, the coordinator, and one token per worker."""
    return _certs(tmp_path_factory.mktemp("pki"), "w1,127.0.0.1", "w2,127.0.0.1")


def _token(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


# -- no oracle for configured ids -------------------------------------------------------------------------------------


def test_the_listener_answers_unknown_and_known_ids_alike(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    token = _token(tmp_path / "site-1.token", new_token())
    config = job_config(tmp_path, listen={"host": "127.0.0.1", "port": 0}, auth={"workers": {"site-1": str(token)}})
    coordinator = CoordinatorProcess(config)
    worker = None
    try:
        url = coordinator.wait_for(r"listening for workers on (ws://[0-9.:]+)").group(1)
        known, unknown = (asyncio.run(_guess(url, worker_id)) for worker_id in ("site-1", "site-9"))
        worker = start_worker(
            digit_shards[0][0], worker_id="site-1", log_path=tmp_path / "site-1.log",
            extra_args=["--threads", "1", "--connect", url, "--token-file", str(token)],
        )
        code = coordinator.finish()
    finally:
        if worker is not None:
            worker.stop()
        coordinator.finish(30)
    assert code == 0, coordinator.output[-3000:]
    assert known == unknown, "the same frames and words, whether the id has a token or not"
    assert known[:2] == ["hello", "auth_challenge"] and known[2].startswith("error:auth_failed:"), known
    assert "no token for worker 'site-9'" in coordinator.output, "the operator's own log says which it was"


async def _guess(url: str, worker_id: str) -> list[str]:
    """A stranger claiming ``worker_id`` with a made-up proof; what the listener sent, nonces and ids aside."""
    hello = {"v": 1, "type": "hello", "role": "worker", "peer_id": worker_id, "auth": "hmac-sha256"}
    frames = [raw_control(hello), raw_control(AuthChallenge(nonce=os.urandom(32).hex()).model_dump()),
              raw_control(AuthProof(mac=os.urandom(32).hex()).model_dump())]
    answers, _ = await exchange(url, frames)
    return [f"error:{a.code}:{a.message}" if isinstance(a, ErrorMessage) else a.type for a in answers]


# -- weak tokens and open token files ---------------------------------------------------------------------------------


def test_weak_or_open_token_files_stop_fl_worker_with_the_fix(
    digit_shards: tuple[list[Path], Path], pki: Path, tmp_path: Path
) -> None:
    shard = digit_shards[0][0]
    weak = _token(tmp_path / "weak.token", "a" * 16)
    repeated = _token(tmp_path / "repeated.token", "z" * 40)
    strong = (pki / "w1" / "token").read_text().strip()
    open_file = _token(tmp_path / "open.token", strong, mode=0o644)
    for path, words in [(weak, "16 bytes long"), (repeated, "repeat too much"), (open_file, f"run `chmod 600 {open_file}`")]:
        done = subprocess.run([*worker_command(), "--data", str(shard), "--port", "0", "--token-file", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and done.stdout == "" and words in done.stderr, done.stderr
        assert strong not in done.stderr
    open_file.chmod(0o600)  # the fix the message gave
    with running(shard, "--token-file", str(open_file)) as worker:
        async def job() -> None:
            async with session_with(worker.url, keyring=_ring(pki / "coordinator" / "tokens" / "w1.token")) as session:
                await _train(session)

        asyncio.run(job())


def test_an_open_token_file_stops_fl_coordinator_with_the_fix(tmp_path: Path) -> None:
    token = _token(tmp_path / "shared.token", new_token(), mode=0o640)
    config = job_config(tmp_path, workers=["ws://127.0.0.1:9"], auth={"token_file": str(token)})
    done = subprocess.run([*coordinator_command(), "train", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"run `chmod 600 {token}`" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- certificate roles ------------------------------------------------------------------------------------------------


def test_a_workers_certificate_cannot_open_another_worker(digit_shards: tuple[list[Path], Path], pki: Path, tmp_path: Path) -> None:
    """Worker w1 holds the shared token and a certificate from the same CA: it still cannot pose as the coordinator
    to w2, whose mutual TLS admits only the coordinator's role. The coordinator's own certificate gets in."""
    shared = _token(tmp_path / "shared.token", new_token())
    ca = pki / "ca" / "ca.pem"
    as_w1 = client_context(ca=ca, cert=pki / "w1" / "cert.pem", key=pki / "w1" / "key.pem")
    as_coordinator = client_context(ca=ca, cert=pki / "coordinator" / "cert.pem", key=pki / "coordinator" / "key.pem")
    with running(digit_shards[0][1], "--token-file", str(shared), *_tls_args(pki, "w2")) as w2:
        async def attempts() -> None:
            with pytest.raises(HandshakeFailed, match="wrong certificate role"):
                async with session_with(w2.url, keyring=_ring(shared), ssl_context=as_w1):
                    pass
            async with session_with(w2.url, keyring=_ring(shared), ssl_context=as_coordinator) as session:
                await _train(session)

        asyncio.run(attempts())
        log = w2.log_path.read_text()
    assert "the peer's TLS certificate is a worker's, not a coordinator's" in log


def test_the_coordinator_refuses_a_listener_with_a_coordinators_certificate(
    digit_shards: tuple[list[Path], Path], pki: Path, tmp_path: Path
) -> None:
    """A rogue listener holding the coordinator's certificate (valid for 127.0.0.1) is not a worker."""
    coordinator = pki / "coordinator"
    rogue = ["--tls-cert", str(coordinator / "cert.pem"), "--tls-key", str(coordinator / "key.pem")]
    with running(digit_shards[0][0], *rogue) as worker:
        url = worker.url.replace("127.0.0.1", "localhost")  # a name the coordinator's certificate lists
        expecting_worker = client_context(ca=pki / "ca" / "ca.pem", cert=coordinator / "cert.pem",
                                          key=coordinator / "key.pem", peer_role="worker")
        with pytest.raises(HandshakeFailed, match="is a coordinator's, not a worker's"):
            asyncio.run(_open(url, expecting_worker))
    with running(digit_shards[0][0], *_tls_args(pki, "w1", mutual=False)) as worker:
        asyncio.run(_open(worker.url, expecting_worker))


async def _open(url: str, ssl_context: object) -> None:
    async with session_with(url, ssl_context=ssl_context) as session:
        await _train(session)
