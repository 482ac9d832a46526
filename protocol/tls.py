"""The TLS contexts of both sides, built in one place so that every connection gets the same safe settings.

* TLS 1.2 at least; Python's defaults for ciphers (no RC4, no export suites, forward secrecy first).
* The dialling side always verifies the listener's certificate *and* its host name against the URL
  (``check_hostname``), with the CA bundle it was given or, without one, the system's.
* The listening side presents its certificate and key; given a CA, it also requires a client certificate
  signed by that CA (mutual TLS), so a peer without one never reaches the WebSocket layer.

Every problem with the files is a :class:`~.errors.CredentialsError` naming the file, raised when the daemon
starts, never at the first connection.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import CredentialsError

__all__ = ["MIN_VERSION", "server_context", "client_context"]

MIN_VERSION = ssl.TLSVersion.TLSv1_2


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


def server_context(*, cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """For the listening side: present ``cert``/``key``; with ``client_ca``, require client certificates it signed."""
    _check_files(certificate=cert, key=key, client_ca_bundle=client_ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    _load_chain(context, cert, key)
    if client_ca is not None:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(*, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """For the dialling side: verify the peer (and its host name) with ``ca``, or the system's CAs without one;
    present ``cert``/``key`` when the listener asks for a client certificate."""
    if (cert is None) != (key is None):
        raise CredentialsError("a TLS client certificate needs both a certificate and its key")
    _check_files(ca_bundle=ca, certificate=cert, key=key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
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
    return context
