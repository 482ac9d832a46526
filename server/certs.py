"""``fl-coordinator certs``: a development CA, a certificate per worker host and one for the coordinator.

For trying TLS and mutual TLS without a PKI; a real deployment should issue certificates from its own CA
(see SECURITY.md). Everything is written with the ``cryptography`` library, private keys with mode 0600::

    OUT/ca/ca.pem, ca.key                  the CA (keep ca.key offline: whoever holds it can mint certificates)
    OUT/<host>/ca.pem, cert.pem, key.pem   one per --host: server and client certificate, names as SANs
    OUT/<host>/token                       with --tokens: a fresh random token for that worker
    OUT/coordinator/ca.pem, cert.pem, key.pem
                                           the coordinator's: client certificate (mutual TLS) and, for
                                           ``listen``, server certificate for the --coordinator-host names
    OUT/coordinator/tokens/<host>.token    with --tokens: a copy of each worker's token

Every certificate names its role in a SAN URI (``urn:fedlink:role:worker`` or ``urn:fedlink:role:coordinator``,
see :mod:`fedlink.protocol.tls`), and both sides check the peer's: a worker accepts only the coordinator's
certificate as a client and the coordinator only workers' certificates, so one worker's certificate cannot open
another worker. (Each certificate keeps both TLS purposes, serverAuth and clientAuth, since a worker may listen or
dial out, and a coordinator may dial or listen.)

One folder per machine, so each can be given (or mounted) alone. ``--host worker-1,10.0.0.5`` names one machine
by several names (DNS names and IP addresses). Files already there are kept, so running the command again is
harmless (new hosts get certificates from the existing CA); ``--force`` replaces everything.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlink.protocol.auth import new_token
from fedlink.protocol.tls import ROLE_URI, Role, roles_of

__all__ = ["Machine", "CertsReport", "make_ca", "issue", "write_certs", "parse_names", "certs"]

_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_RESERVED = {"ca", "coordinator"}
_SKEW = dt.timedelta(minutes=5)  # valid a little before now, for machines whose clocks disagree slightly

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Machine:
    """One certificate's subject: ``names[0]`` names its folder; every name becomes a DNS or IP SAN."""

    names: tuple[str, ...]

    @property
    def folder(self) -> str:
        return self.names[0]

    def sans(self, role: Role | None = None) -> list[x509.GeneralName]:
        out: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI.format(role=role))] if role else []
        for name in self.names:
            try:
                out.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                out.append(x509.DNSName(name))
        return out


@dataclass
class CertsReport:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_names(value: str) -> Machine:
    """``"worker-1,10.0.0.5"`` -> a Machine; raises ValueError naming a bad name."""
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise ValueError("empty host name")
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not _NAME.fullmatch(name) or len(name) > 253:
                raise ValueError(f"{name!r} is neither a DNS name nor an IP address") from None
    return Machine(names)


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _window(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - _SKEW, now + dt.timedelta(days=days)


def make_ca(*, common_name: str = "fedlink development CA", days: int = 365) -> tuple[Key, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _window(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: Key, ca_cert: x509.Certificate, machine: Machine, *, common_name: str, role: Role, days: int = 365
) -> tuple[Key, x509.Certificate]:
    """A leaf certificate for ``machine`` in ``role``, good for TLS servers and clients alike (both extended key
    usages: a worker may listen or dial out); the role, named in a SAN URI, is what tells the two apart."""
    key = _key()
    start, end = _window(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(machine.sans(role)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, *, secret: bool, report: CertsReport) -> None:
    """Write atomically (a reader never sees half a key), private files with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    report.written.append(path)


def _pem_key(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(out: Path, days: int, force: bool, report: CertsReport) -> tuple[Key, x509.Certificate]:
    cert_path, key_path = out / "ca" / "ca.pem", out / "ca" / "ca.key"
    if not force and cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise click.ClickException(f"{key_path} is not an EC key written by this command; use --force")
        report.kept += [cert_path, key_path]
        return key, cert
    key, cert = make_ca(days=days)
    _write(key_path, _pem_key(key), secret=True, report=report)
    _write(cert_path, _pem_cert(cert), secret=False, report=report)
    return key, cert


def _leaf(
    folder: Path, machine: Machine, common_name: str, ca: tuple[Key, x509.Certificate], *, role: Role, days: int,
    force: bool, report: CertsReport,
) -> None:
    ca_key, ca_cert = ca
    cert_path, key_path, ca_copy = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    if not force and cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        report.kept += [cert_path, key_path]
        if not _signed_by(existing, ca_cert) or _names(existing) != set(machine.names):
            report.notes.append(f"kept {cert_path}, which does not match the request (other CA or names); --force reissues")
        elif _roles(existing) != {role}:
            report.notes.append(f"kept {cert_path}, which does not name its role ({role}); --force reissues")
    else:
        key, cert = issue(ca_key, ca_cert, machine, common_name=common_name, role=role, days=days)
        _write(key_path, _pem_key(key), secret=True, report=report)
        _write(cert_path, _pem_cert(cert), secret=False, report=report)
    if force or not ca_copy.exists() or ca_copy.read_bytes() != _pem_cert(ca_cert):
        _write(ca_copy, _pem_cert(ca_cert), secret=False, report=report)


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    }


def _roles(cert: x509.Certificate) -> set[str]:
    return roles_of(cert.public_bytes(serialization.Encoding.DER))


def _tokens(out: Path, hosts: Sequence[Machine], force: bool, report: CertsReport) -> None:
    """One token per worker, and the coordinator's copy of each; the worker's file is the original."""
    for machine in hosts:
        own = out / machine.folder / "token"
        copy = out / "coordinator" / "tokens" / f"{machine.folder}.token"
        if force or not own.exists():
            _write(own, (new_token() + "\n").encode(), secret=True, report=report)
        else:
            report.kept.append(own)
        if force or not copy.exists() or copy.read_bytes() != own.read_bytes():
            _write(copy, own.read_bytes(), secret=True, report=report)


def write_certs(
    out: Path,
    *,
    hosts: Sequence[Machine],
    coordinator: Machine,
    tokens: bool = False,
    days: int = 365,
    force: bool = False,
) -> CertsReport:
    """Write (or complete) the layout described in this module's docstring; returns what was written and kept."""
    folders = [m.folder for m in hosts]
    clash = sorted({f for f in folders if f in _RESERVED or folders.count(f) > 1})
    if clash:
        raise click.UsageError(f"host name(s) {', '.join(clash)} repeat or clash with the ca/coordinator folders")
    report = CertsReport()
    ca = _ca(out, days, force, report)
    for machine in hosts:
        _leaf(out / machine.folder, machine, machine.folder, ca, role="worker", days=days, force=force, report=report)
    _leaf(
        out / "coordinator", coordinator, "fedlink coordinator", ca, role="coordinator", days=days, force=force,
        report=report,
    )
    if tokens:
        _tokens(out, hosts, force, report)
    return report


def _machine(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[Machine, ...]:
    try:
        return tuple(parse_names(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("certs")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write into (one subfolder per machine).")
@click.option("--host", "hosts", multiple=True, metavar="NAME[,ALT...]", callback=_machine, required=True,
              help="A worker machine: its DNS names and IP addresses, comma-separated; the first names its folder. Repeatable.")
@click.option("--coordinator-host", "coordinator", default="localhost,127.0.0.1", show_default=True,
              metavar="NAME[,ALT...]", help="The names workers dial when the coordinator listens (config listen).")
@click.option("--tokens", is_flag=True, help="Also write a fresh token per worker, and the coordinator's copies.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="Validity of every certificate.")
@click.option("--force", is_flag=True, help="Replace existing files (a new CA: every machine needs its new files).")
def certs(out: Path, hosts: tuple[Machine, ...], coordinator: str, tokens: bool, days: int, force: bool) -> None:
    """Generate a development CA, a certificate and key per --host, and the coordinator's client certificate.

    For trying TLS; use your own CA in production (see SECURITY.md).
    """
    try:
        coordinator_machine = parse_names(coordinator)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--coordinator-host") from exc
    try:
        report = write_certs(out, hosts=hosts, coordinator=coordinator_machine, tokens=tokens, days=days, force=force)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot write certificates to {out}: {exc}") from exc
    for path in report.written:
        click.echo(f"wrote {path}")
    for path in report.kept:
        click.echo(f"kept  {path}")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    first = hosts[0].folder
    click.echo(
        f"\nworker:      fl-worker ... --tls-cert {out / first / 'cert.pem'} --tls-key {out / first / 'key.pem'} "
        f"--tls-ca {out / first / 'ca.pem'}" + (f" --token-file {out / first / 'token'}" if tokens else "")
        + f"\ncoordinator: tls: {{ca: {out / 'coordinator' / 'ca.pem'}, cert: {out / 'coordinator' / 'cert.pem'}, "
        f"key: {out / 'coordinator' / 'key.pem'}}}, worker URLs wss://{first}:PORT"
        + (f", token_file: {out / 'coordinator' / 'tokens' / (first + '.token')}" if tokens else "")
    )
