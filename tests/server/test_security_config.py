"""The coordinator's auth and tls settings: parsing, paths, mistakes named, credentials read at start, and a
listener that never lets an unauthenticated worker replace a connected one."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedlink.protocol.auth import Keyring, Secret, new_token
from fedlink.protocol.channel import memory_pair
from fedlink.protocol.errors import AuthenticationFailed, CredentialsError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import ErrorMessage, Hello
from fedlink.protocol.frames import decode_frame
from fedlink.protocol.session import SessionOptions, handshake
from fedlink.server.certs import Machine, write_certs
from fedlink.server.config import load_config, parse_config
from fedlink.server.errors import ConfigError
from fedlink.server.pool import WorkerPool
from fedlink.server.security import Security

MINIMAL: dict[str, Any] = {"name": "t", "model": {"factory": "fedlink.models:mlp"}, "rounds": 1}
TOKEN = "Vt3Rk9qHxA0mZcL7wYpE2sNfGu5JdBo8iKyQ1rXhT4e"  # secrets.token_urlsafe(32), drawn once


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    write_certs(out, hosts=[Machine(("w1", "127.0.0.1"))], coordinator=Machine(("localhost",)), tokens=True)
    return out


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    data = {
        **MINIMAL,
        "workers": ["wss://a:1", {"url": "wss://b:1", "token_file": "secrets/b.token"}],
        "listen": {"port": 0},
        "auth": {"token_file": "secrets/shared.token", "workers": {"nat-1": "/abs/nat.token"}},
        "tls": {"ca": "pki/ca.pem", "cert": "pki/c.pem", "key": "pki/c.key"},
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(data))
    config = load_config(folder / "c.yaml")
    assert config.workers[0].token_file is None and config.workers[1].token_file == folder / "secrets" / "b.token"
    assert config.auth.token_file == folder / "secrets" / "shared.token"
    assert config.auth.workers == {"nat-1": Path("/abs/nat.token")}
    assert config.tls is not None and (config.tls.ca, config.tls.cert, config.tls.key) == (
        folder / "pki" / "ca.pem", folder / "pki" / "c.pem", folder / "pki" / "c.key"
    )
    assert config.listen is not None and config.listen.max_connections == 1024


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"workers": ["ws://a:1"], "tls": {"ca": "ca.pem"}}, "ws://a:1 would be dialled in plain text; use wss://"),
        ({"workers": ["wss://a:1"], "tls": {"cert": "c.pem"}}, "tls.cert and tls.key go together"),
        ({"listen": {}, "tls": {"ca": "ca.pem"}}, "listen with tls needs tls.cert"),
        ({"workers": ["wss://a:1"], "tls": {"require_client_cert": True}}, "require_client_cert needs tls.ca"),
        ({"workers": ["ws://a:1"], "auth": {"workers": {"x": "t"}}}, "auth.workers names workers that dial in"),
        ({"workers": ["ws://a:1"], "auth": {"tokenfile": "t"}}, "unknown key"),
        ({"workers": [{"url": "ws://a:1", "token": "inline"}]}, "unknown key"),
        ({"listen": {"max_connections": 0}}, "listen.max_connections"),
    ],
)
def test_mistakes_are_named(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({**MINIMAL, **extra})
    assert words in str(refused.value)


def test_security_picks_each_workers_token(tmp_path: Path, pki: Path) -> None:
    shared = tmp_path / "shared.token"
    shared.write_text(TOKEN)
    shared.chmod(0o600)
    own = pki / "coordinator" / "tokens" / "w1.token"
    config = parse_config({
        **MINIMAL,
        "workers": ["wss://other:1", {"url": "wss://w1:1", "token_file": str(own)}],
        "auth": {"token_file": str(shared)},
        "tls": {"ca": str(pki / "ca" / "ca.pem")},
    })
    security = Security.from_config(config)
    default, specific = (security.keyring_for(w) for w in config.workers)
    assert default is not None and default.shared is not None
    assert specific is not None and specific.shared is not None
    assert default.shared.key == Secret.from_token(TOKEN.encode(), origin="x").key
    assert specific.shared.key == Secret.from_token(own.read_bytes(), origin="x").key
    assert str(own) in specific.shared.origin and str(shared) in default.shared.origin
    assert isinstance(security.ssl_for(config.workers[0]), ssl.SSLContext)
    assert security.listen_keyring is None and security.listen_ssl is None


def test_listener_keyring_and_tls(pki: Path, tmp_path: Path) -> None:
    coordinator = pki / "coordinator"
    config = parse_config({
        **MINIMAL,
        "listen": {"port": 0},
        "auth": {"workers": {"w1": str(coordinator / "tokens" / "w1.token")}},
        "tls": {"ca": str(coordinator / "ca.pem"), "cert": str(coordinator / "cert.pem"),
                "key": str(coordinator / "key.pem"), "require_client_cert": True},
    })
    security = Security.from_config(config)
    assert security.listen_keyring is not None and security.listen_keyring.for_peer("w1") is not None
    assert security.listen_keyring.for_peer("w2") is None, "no shared token: only listed ids get in"
    assert security.listen_ssl is not None and security.listen_ssl.verify_mode == ssl.CERT_REQUIRED


def test_unusable_credentials_stop_the_job_before_it_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weak = tmp_path / "weak.token"
    weak.write_text("short")
    for auth, words in [({"token_file": str(tmp_path / "missing")}, "missing"), ({"token_file": str(weak)}, "weak.token")]:
        with pytest.raises(CredentialsError, match=words):
            Security.from_config(parse_config({**MINIMAL, "workers": ["ws://a:1"], "auth": auth}))
    with pytest.raises(CredentialsError, match="ca.pem"):
        Security.from_config(parse_config({**MINIMAL, "workers": ["wss://a:1"], "tls": {"ca": str(tmp_path / "ca.pem")}}))


def test_missing_protection_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedlink.server"):
        Security.from_config(parse_config({**MINIMAL, "workers": ["ws://a:1"], "listen": {"host": "0.0.0.0", "port": 0}}))
    assert "no token for ws://a:1" in caplog.text
    assert "takes any worker that dials in, unauthenticated" in caplog.text
    assert "not loopback and has no TLS" in caplog.text


# -- the listener: who may take a worker id ------------------------------------------------------------------------

LIMITS = Limits()
QUIET = SessionOptions(heartbeat_interval=0)


def _pool(keyring: Keyring | None) -> WorkerPool:
    return WorkerPool([], hello=Hello(role="coordinator", peer_id="c"), limits=LIMITS, options=QUIET,
                      connect_timeout=5, listen_keyring=keyring)


async def _dial_in(pool: WorkerPool, worker_id: str, token: str | None) -> tuple[asyncio.Task[None], Any, Any]:
    """A worker dialling in over a memory channel; returns the pool's task, the worker's end and its handshake."""
    pool_end, worker_end = memory_pair("pool", f"worker {worker_id}")
    task = asyncio.ensure_future(pool._accept(pool_end))
    keyring = Keyring(shared=Secret.from_token(token.encode(), origin="t")) if token else None
    result = await asyncio.gather(
        handshake(worker_end, Hello(role="worker", peer_id=worker_id), limits=LIMITS, timeout=5, keyring=keyring, initiator=True),
        return_exceptions=True,
    )
    await asyncio.sleep(0)  # let the pool attach the session
    return task, worker_end, result[0]


async def test_open_listener_never_lets_a_newcomer_replace_a_connected_worker() -> None:
    pool = _pool(None)
    first_task, _, first = await _dial_in(pool, "w1", None)
    assert isinstance(first, Hello)
    session = pool.dialled_in["w1"].session
    second_task, second_end, _ = await _dial_in(pool, "w1", None)
    await asyncio.wait_for(second_task, 5)
    told = decode_frame(await second_end.recv(), LIMITS)
    assert isinstance(told, ErrorMessage) and told.code == "duplicate_worker" and "already connected" in told.message
    assert pool.dialled_in["w1"].session is session and not session.closed
    other_task, _, other = await _dial_in(pool, "w2", None)
    assert isinstance(other, Hello) and pool.dialled_in["w2"].connected, "another id is still welcome"
    await pool.close("test over")
    await asyncio.gather(first_task, other_task)


async def test_authenticating_listener_lets_only_the_token_holder_replace_a_session() -> None:
    pool = _pool(Keyring(per_peer={"w1": Secret.from_token(TOKEN.encode(), origin="w1's token")}))
    first_task, _, first = await _dial_in(pool, "w1", TOKEN)
    assert isinstance(first, Hello)
    session = pool.dialled_in["w1"].session
    impostor_task, _, impostor = await _dial_in(pool, "w1", new_token())
    assert isinstance(impostor, AuthenticationFailed)
    await asyncio.wait_for(impostor_task, 5)
    assert pool.dialled_in["w1"].session is session and not session.closed
    anonymous_task, _, anonymous = await _dial_in(pool, "w1", None)
    assert isinstance(anonymous, AuthenticationFailed) and pool.dialled_in["w1"].session is session
    again_task, _, again = await _dial_in(pool, "w1", TOKEN)
    assert isinstance(again, Hello), "the worker itself, reconnecting, takes over its id"
    assert session.closed and pool.dialled_in["w1"].session is not session
    await pool.close("test over")
    await asyncio.gather(first_task, again_task, anonymous_task)
