"""``fl-coordinator certs``: what the certificates say, that they chain to the CA, and that reruns keep files."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedlink.protocol.auth import Secret
from fedlink.protocol.tls import ROLE_URI, client_context, peer_role_problem, roles_of, server_context
from fedlink.server.certs import Machine, parse_names, write_certs
from fedlink.server.cli import main


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, ["certs", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_layout_names_usages_and_chain(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    _run("--out", str(out), "--host", "worker-1,10.0.0.5", "--host", "worker-2", "--coordinator-host", "coord.lan")
    ca = _cert(out / "ca" / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expected = {"worker-1": ({"worker-1"}, {"10.0.0.5"}), "worker-2": ({"worker-2"}, set()), "coordinator": ({"coord.lan"}, set())}
    for folder, (dns, ips) in expected.items():
        cert = _cert(out / folder / "cert.pem")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == dns
        assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(i) for i in ips}
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
        assert (out / folder / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
        key = (out / folder / "key.pem").read_bytes()
        assert b"ENCRYPTED" not in key and (out / folder / "key.pem").stat().st_mode & 0o077 == 0
    assert (out / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    assert not (out / "worker-1" / "token").exists(), "tokens only with --tokens"


def test_rerun_keeps_files_adds_hosts_and_tokens_match(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    _run("--out", str(out), "--host", "a", "--host", "b", "--tokens")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    output = _run("--out", str(out), "--host", "a", "--host", "b", "--host", "c", "--tokens")
    assert all(p.read_bytes() == data for p, data in before.items()), "existing files are kept"
    assert "kept" in output and (out / "c" / "cert.pem").exists()
    _cert(out / "c" / "cert.pem").verify_directly_issued_by(_cert(out / "ca" / "ca.pem"))
    for host in "abc":
        token = out / host / "token"
        assert token.read_bytes() == (out / "coordinator" / "tokens" / f"{host}.token").read_bytes()
        assert token.stat().st_mode & 0o077 == 0
        Secret.from_token(token.read_bytes(), origin="t")  # long enough to be accepted
    assert len({(out / h / "token").read_bytes() for h in "abc"}) == 3, "each worker has its own token"
    _run("--out", str(out), "--host", "a", "--force")
    assert (out / "ca" / "ca.pem").read_bytes() != before[out / "ca" / "ca.pem"], "--force makes a new CA"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", "coordinator"], "clash"),
        (["--host", "a", "--host", "a"], "repeat"),
        (["--host", "bad name!"], "neither a DNS name nor an IP address"),
        (["--host", ","], "empty host name"),
    ],
)
def test_bad_hosts_are_refused(tmp_path: Path, args: list[str], words: str) -> None:
    result = CliRunner().invoke(main, ["certs", "--out", str(tmp_path / "pki"), *args])
    assert result.exit_code == 2 and words in result.output


def test_write_certs_uses_ec_keys(tmp_path: Path) -> None:
    write_certs(tmp_path, hosts=[parse_names("h")], coordinator=Machine(("localhost",)))
    assert isinstance(_cert(tmp_path / "h" / "cert.pem").public_key(), ec.EllipticCurvePublicKey)


def test_each_certificate_names_its_role(tmp_path: Path) -> None:
    """Workers' certificates say ``worker``, the coordinator's says ``coordinator`` (a SAN URI both sides check)."""
    out = tmp_path / "pki"
    _run("--out", str(out), "--host", "worker-1", "--host", "worker-2")
    for folder, role in (("worker-1", "worker"), ("worker-2", "worker"), ("coordinator", "coordinator")):
        san = _cert(out / folder / "cert.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ROLE_URI.format(role=role)], folder
        assert roles_of(_cert(out / folder / "cert.pem").public_bytes(Encoding.DER)) == {role}


def test_the_role_check_of_each_side(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    write_certs(out, hosts=[Machine(("w1", "127.0.0.1"))], coordinator=Machine(("localhost",)))
    der = {name: _cert(out / name / "cert.pem").public_bytes(Encoding.DER) for name in ("w1", "coordinator")}
    worker_side = server_context(cert=out / "w1" / "cert.pem", key=out / "w1" / "key.pem", client_ca=out / "ca" / "ca.pem",
                                 peer_role="coordinator")
    assert peer_role_problem(worker_side, der["coordinator"]) is None
    assert "is a worker's, not a coordinator's" in (peer_role_problem(worker_side, der["w1"]) or "")
    assert peer_role_problem(worker_side, None) is None, "no client certificate: TLS itself decides"
    coordinator_side = client_context(ca=out / "ca" / "ca.pem", cert=out / "coordinator" / "cert.pem",
                                      key=out / "coordinator" / "key.pem", peer_role="worker")
    assert peer_role_problem(coordinator_side, der["w1"]) is None
    assert "not a worker's" in (peer_role_problem(coordinator_side, der["coordinator"]) or "")
    # A certificate without any role (another PKI) is refused only by a side whose own certificate has one.
    foreign = _foreign_der()
    assert "names no fedlink role" in (peer_role_problem(coordinator_side, foreign) or "")
    assert peer_role_problem(client_context(ca=out / "ca" / "ca.pem", peer_role="worker"), foreign) is None
    assert peer_role_problem(client_context(ca=out / "ca" / "ca.pem"), der["coordinator"]) is None, "no role asked"


def _foreign_der() -> bytes:
    from fedlink.server.certs import make_ca

    _, cert = make_ca(common_name="another CA")
    return cert.public_bytes(Encoding.DER)
