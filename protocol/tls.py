"""The TLS contexts of both sides, built in one place so that every connection gets the same safe settings.

* TLS 1.2 at least; Python's defaults for ciphers (no RC4, no export suites, forward secrecy first).
* The dialling side always verifies the listener's certificate *and* its host name against the URL
  (``check_hostname``), with the CA bundle it was given or, without one, the system's.
* The listening side presents its certificate and key; given a CA, it also requires a client certificate
  signed by that CA (mutual TLS), so a peer without one never reaches the WebSocket layer.
* Roles: ``fl-coordinator certs`` names each certificate's role in a SAN URI (:data:`ROLE_URI`, ``worker`` or
  ``coordinator``). A context built with ``peer_role`` remembers which role the peer must have, and
  :func:`peer_role_problem` (called by the transport right after the TLS handshake, before any fedlink byte) refuses
  a certificate that names another role, so one worker's certificate cannot open another worker. When our own
  certificate names a role, the peer's must name one too; certificates from another CA (no role at all) are
  accepted as before when ours has none.

Every problem with the files is a :class:`~.errors.CredentialsError` naming the file, raised when the daemon
starts, never at the first connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .errors import CredentialsError

__all__ = [
    "MIN_VERSION", "ROLE_URI", "Role", "PeerRole", "server_context", "client_context", "roles_of", "peer_role_problem",
]

MIN_VERSION = ssl.TLSVersion.TLSv1_2
#: The SAN URI naming a certificate's role, ``ROLE_URI.format(role="worker")``.
ROLE_URI = "urn:fedlink:role:{role}"
_ROLE_PREFIX = ROLE_URI.format(role="")
_DER = Encoding.DER

Role = Literal["worker", "coordinator"]


@dataclass(frozen=True)
class PeerRole:
    """What a context requires of the peer's certificate: ``expected`` role; ``strict``: a role must be named."""

    expected: Role
    strict: bool


class _Context(ssl.SSLContext):
    """An SSLContext that remembers which role its peer must have (None: any)."""

    peer_role: PeerRole | None = None


def roles_of(der: bytes) -> set[str]:
    """The fedlink roles a DER certificate names in its SAN URIs (empty when it names none or cannot be read)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return set()
    return {uri[len(_ROLE_PREFIX):] for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.startswith(_ROLE_PREFIX)}


def _own_roles(cert: Path) -> set[str]:
    try:
        pem = Path(cert).read_bytes()
        return roles_of(x509.load_pem_x509_certificate(pem).public_bytes(_DER))
    except (OSError, ValueError):
        return set()  # _load_chain reports an unusable file with the right words


def peer_role_problem(context: ssl.SSLContext | None, peer_der: bytes | None) -> str | None:
    """Why the peer's certificate ``peer_der`` may not play the role ``context`` expects, or None when it may."""
    required = getattr(context, "peer_role", None)
    if not isinstance(required, PeerRole) or peer_der is None:
        return None
    roles = roles_of(peer_der)
    if required.expected in roles:
        return None
    if roles:
        return (
            f"the peer's TLS certificate is a {' and '.join(sorted(roles))}'s, not a {required.expected}'s: one "
            f"machine's certificate cannot open another; give the {required.expected} its own certificate "
            "(fl-coordinator certs writes one per machine)"
        )
    if required.strict:
        return (
            f"the peer's TLS certificate names no fedlink role, while ours does: issue the {required.expected}'s "
            "certificate with fl-coordinator certs (from the same CA)"
        )
    return None


def _check_files(**files: Path | None) -> None:
    for what, path in files.items():
        if path is not None and not Path(path).is_file():
            raise CredentialsError(f"TLS {what.replace('_', ' ')} {path} does not exist or is not a file")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise CredentialsError(
            f"cannot use TLS certificate {cert} with key {key}: {exc.reason or exc} "
            "(both PEM files? does the key belong to the certificate? is the key unencrypted?)"
        ) from exc
    except OSError as exc:
        raise CredentialsError(f"cannot read TLS certificate {cert} or key {key}: {exc.strerror or exc}") from exc


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialsError(f"cannot use CA bundle {ca}: {getattr(exc, 'reason', None) or exc} (a PEM file?)") from exc
    except OSError as exc:
        raise CredentialsError(f"cannot read CA bundle {ca}: {exc.strerror or exc}") from exc


def server_context(
    *, cert: Path, key: Path, client_ca: Path | None = None, peer_role: Role | None = None
) -> ssl.SSLContext:
    """For the listening side: present ``cert``/``key``; with ``client_ca``, require client certificates it signed;
    with ``peer_role``, of that role (see :func:`peer_role_problem`)."""
    _check_files(certificate=cert, key=key, client_ca_bundle=client_ca)
    context = _Context(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    _load_chain(context, cert, key)
    if client_ca is not None:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    if peer_role is not None:
        context.peer_role = PeerRole(peer_role, strict=bool(_own_roles(cert)))
    return context


def client_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None, peer_role: Role | None = None
) -> ssl.SSLContext:
    """For the dialling side: verify the peer (and its host name) with ``ca``, or the system's CAs without one;
    present ``cert``/``key`` when the listener asks for a client certificate; with ``peer_role``, require the
    listener's certificate to be of that role (see :func:`peer_role_problem`)."""
    if (cert is None) != (key is None):
        raise CredentialsError("a TLS client certificate needs both a certificate and its key")
    _check_files(ca_bundle=ca, certificate=cert, key=key)
    context = _Context(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MIN_VERSION
    # The defaults of PROTOCOL_TLS_CLIENT, set again so that no later default change can weaken them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if ca is not None:
        _load_ca(context, ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    if peer_role is not None:
        context.peer_role = PeerRole(peer_role, strict=cert is not None and bool(_own_roles(cert)))
    return context
