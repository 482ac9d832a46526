"""TLS contexts: safe settings on both sides, and every unusable file refused at once, naming it."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from fedlink.protocol.errors import CredentialsError
from fedlink.protocol.tls import client_context, server_context
from fedlink.server.certs import Machine, write_certs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    write_certs(out, hosts=[Machine(("w1", "127.0.0.1"))], coordinator=Machine(("localhost",)))
    return out


def test_client_context_verifies_certificate_and_host_name(pki: Path) -> None:
    for context in (client_context(ca=pki / "ca" / "ca.pem"), client_context()):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_context(ca=pki / "ca" / "ca.pem").cert_store_stats()["x509_ca"] == 1


def test_server_context_requires_client_certificates_only_with_a_ca(pki: Path) -> None:
    plain = server_context(cert=pki / "w1" / "cert.pem", key=pki / "w1" / "key.pem")
    assert plain.verify_mode == ssl.CERT_NONE and plain.minimum_version >= ssl.TLSVersion.TLSv1_2
    mutual = server_context(cert=pki / "w1" / "cert.pem", key=pki / "w1" / "key.pem", client_ca=pki / "w1" / "ca.pem")
    assert mutual.verify_mode == ssl.CERT_REQUIRED


def test_unusable_files_are_refused_naming_them(pki: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = pki / "w1" / "cert.pem", pki / "w1" / "key.pem"
    other_key = pki / "coordinator" / "key.pem"
    cases = [
        (lambda: server_context(cert=tmp_path / "missing.pem", key=key), "missing.pem"),
        (lambda: server_context(cert=cert, key=other_key), "does the key belong"),
        (lambda: server_context(cert=garbage, key=key), "garbage.pem"),
        (lambda: server_context(cert=cert, key=key, client_ca=garbage), "garbage.pem"),
        (lambda: client_context(ca=garbage), "garbage.pem"),
        (lambda: client_context(ca=tmp_path), "not a file"),
        (lambda: client_context(cert=cert), "both a certificate and its key"),
    ]
    for build, words in cases:
        with pytest.raises(CredentialsError, match=words):
            build()
