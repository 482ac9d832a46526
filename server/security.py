"""The coordinator's credentials, read once at start: which token and TLS context each connection uses.

* A worker the coordinator dials uses the ``token_file`` of its entry, else ``auth.token_file``; ``wss://`` URLs
  are verified with ``tls.ca`` (the system's CAs without one) and present ``tls.cert``/``tls.key`` when set.
* Workers that dial in (``listen``) authenticate with ``auth.workers[their id]``, else ``auth.token_file``; the
  listener uses TLS when ``tls.cert``/``tls.key`` are set, and requires client certificates from ``tls.ca`` when
  ``tls.require_client_cert`` is. Every TLS peer must hold a worker's certificate (its role, see
  :mod:`fedlink.protocol.tls`), so a certificate of the coordinator's role cannot pose as a worker.

Every file is read here, so a missing or weak token or a broken certificate stops the job before it starts,
with a :class:`~fedlink.protocol.errors.CredentialsError` naming the file. Secrets are never logged.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from fedlink.protocol.auth import Keyring, Secret, secret_from_file
from fedlink.protocol.tls import client_context, server_context

from .config import JobConfig, WorkerEntry

__all__ = ["Security"]

log = logging.getLogger("fedlink.server")


@dataclass
class Security:
    """Keyrings and TLS contexts for every connection of one job; build with :meth:`from_config`."""

    dial_ssl: ssl.SSLContext | None = None
    listen_ssl: ssl.SSLContext | None = None
    listen_keyring: Keyring | None = None
    _shared: Secret | None = None
    _secrets: dict[Path, Secret] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: JobConfig) -> "Security":
        security = cls()
        if config.auth.token_file is not None:
            security._shared = security._read(config.auth.token_file)
        for entry in config.workers:
            if entry.token_file is not None:
                security._read(entry.token_file)
        per_peer = {worker_id: security._read(path) for worker_id, path in config.auth.workers.items()}
        if config.listen is not None and (per_peer or security._shared is not None):
            security.listen_keyring = Keyring(
                shared=security._shared,
                per_peer=per_peer,
                missing="list its id under auth.workers in the coordinator's config, or set auth.token_file",
            )
        tls = config.tls
        if tls is not None:
            # Both ways the peer must be a worker: a certificate issued to another coordinator (or naming no role,
            # when ours names one) is refused right after TLS (see fedlink.protocol.tls.peer_role_problem).
            security.dial_ssl = client_context(ca=tls.ca, cert=tls.cert, key=tls.key, peer_role="worker")
            if config.listen is not None and tls.cert is not None and tls.key is not None:
                security.listen_ssl = server_context(
                    cert=tls.cert, key=tls.key, client_ca=tls.ca if tls.require_client_cert else None,
                    peer_role="worker",
                )
        security._warn(config)
        return security

    def _read(self, path: Path) -> Secret:
        if path not in self._secrets:
            self._secrets[path] = secret_from_file(path)
        return self._secrets[path]

    def keyring_for(self, entry: WorkerEntry) -> Keyring | None:
        """The token a dialled worker must prove it holds (and that we prove we hold), or None."""
        secret = self._secrets[entry.token_file] if entry.token_file is not None else self._shared
        return Keyring(shared=secret) if secret is not None else None

    def ssl_for(self, entry: WorkerEntry) -> ssl.SSLContext | None:
        return self.dial_ssl if entry.url.startswith("wss://") else None

    def _warn(self, config: JobConfig) -> None:
        open_workers = [w.url for w in config.workers if self.keyring_for(w) is None]
        if open_workers:
            log.warning(
                "no token for %s: those workers cannot prove who they are, nor check that this is their "
                "coordinator; set auth.token_file (see SECURITY.md)", ", ".join(open_workers),
            )
        if config.listen is not None:
            if self.listen_keyring is None:
                log.warning(
                    "the listener on %s:%d takes any worker that dials in, unauthenticated; set auth.token_file "
                    "or auth.workers (see SECURITY.md)", config.listen.host, config.listen.port,
                )
            if self.listen_ssl is None and not _is_loopback(config.listen.host):
                log.warning(
                    "the listener on %s is not loopback and has no TLS: updates cross the network in plain text; "
                    "set tls.cert and tls.key", config.listen.host,
                )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
