"""``fl-worker``'s security options: combinations refused with a clear message, and loud warnings when open."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedlink.server.certs import Machine, write_certs
from fedlink.worker import cli


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    write_certs(out, hosts=[Machine(("w1", "127.0.0.1"))], coordinator=Machine(("localhost",)), tokens=True)
    return out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tls-cert", "{pki}/w1/cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "{pki}/w1/ca.pem"], "also needs the worker's own --tls-cert"),
        (["--connect", "ws://127.0.0.1:1", "--tls-ca", "{pki}/w1/ca.pem"], "need a wss:// coordinator URL"),
        (["--token-file", "{pki}/missing"], "cannot read token file"),
        (["--tls-cert", "{pki}/w1/cert.pem", "--tls-key", "{pki}/coordinator/key.pem"], "does the key belong"),
        (["--id", "lab[/x]"], "'lab[/x]' is not a valid worker id: use 1 to 128 characters"),
        (["--id", "a\nb"], "is not a valid worker id"),
        (["--max-connections-per-address", "0"], "--max-connections-per-address"),
    ],
)
def test_refused_before_anything_is_loaded(pki: Path, args: list[str], words: str) -> None:
    argv = ["--data", "/nonexistent/shard.npy", *(a.format(pki=pki) for a in args)]
    result = CliRunner().invoke(cli.main, argv, env={"FEDLINK_TOKEN": ""})
    assert result.exit_code != 0 and words in result.output, result.output


def test_a_short_token_in_the_environment_is_refused(pki: Path) -> None:
    result = CliRunner().invoke(cli.main, ["--data", "/nonexistent.npy"], env={"FEDLINK_TOKEN": "pass"})
    assert result.exit_code != 0 and "$FEDLINK_TOKEN is too weak: 4 bytes long" in result.output and "pass\n" not in result.output


def _warnings(caplog: pytest.LogCaptureFixture, **kwargs: object) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedlink.worker"):
        cli._warn(**kwargs)  # type: ignore[arg-type]
    return caplog.text


def test_open_worker_warnings(caplog: pytest.LogCaptureFixture) -> None:
    text = _warnings(caplog, secret=None, host="127.0.0.1", host_given=False, connect_url=None, tls=False)
    assert "this worker is OPEN" in text and "loopback only" in text and "NOT a loopback" not in text
    text = _warnings(caplog, secret=None, host="0.0.0.0", host_given=True, connect_url=None, tls=False)
    assert "this worker is OPEN" in text and "0.0.0.0, which is NOT a loopback address" in text
    assert "without TLS" in text
    text = _warnings(caplog, secret=None, host="127.0.0.1", host_given=False, connect_url="ws://10.1.2.3:8700", tls=False)
    assert "OPEN" in text and "dialling ws://10.1.2.3:8700 without TLS" in text


def test_a_protected_worker_says_nothing(caplog: pytest.LogCaptureFixture, pki: Path) -> None:
    from fedlink.protocol.auth import secret_from_file

    secret = secret_from_file(pki / "w1" / "token")
    assert _warnings(caplog, secret=secret, host="0.0.0.0", host_given=True, connect_url=None, tls=True) == ""
    assert _warnings(caplog, secret=secret, host="::1", host_given=True, connect_url=None, tls=False) == ""


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
                                                ("0.0.0.0", False), ("10.0.0.1", False), ("worker.lan", False)])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert cli._is_loopback(host) is loopback
