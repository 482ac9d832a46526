"""A worker as the coordinator sees it: a URL, and a session once connected (whichever side dialled)."""

from __future__ import annotations

import logging
import ssl

from fedlink.protocol.auth import Keyring
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.session import Session, SessionOptions, handshake
from fedlink.protocol.transport import dial

__all__ = ["RemoteWorker"]

log = logging.getLogger("fedlink.server")


class RemoteWorker:
    """``keyring`` and ``ssl_context`` are what dialling this worker needs: its token and TLS settings."""

    def __init__(self, url: str, *, keyring: Keyring | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.keyring = keyring
        self.ssl_context = ssl_context
        self.session: Session | None = None
        self.hello: Hello | None = None
        self.last_error = ""

    @property
    def name(self) -> str:
        return self.hello.peer_id if self.hello is not None else self.url

    @property
    def connected(self) -> bool:
        return self.session is not None and not self.session.closed

    @property
    def num_samples(self) -> int:
        return self.hello.dataset.num_samples if self.hello and self.hello.dataset else 0

    def attach(self, session: Session) -> None:
        """Adopt an already handshaken session (in-memory tests, and workers that dial in)."""
        self.session = session
        self.hello = session.peer_hello
        self.last_error = ""

    async def connect(self, *, hello: Hello, limits: Limits, timeout: float, options: SessionOptions) -> bool:
        """Dial and handshake; on failure remember why (``last_error``) and return False."""
        if self.connected:
            return True
        channel = None
        try:
            channel = await dial(self.url, limits=limits, timeout=timeout, ssl_context=self.ssl_context)
            peer = await handshake(
                channel, hello, limits=limits, timeout=timeout, keyring=self.keyring, initiator=True
            )
        except ProtocolError as exc:
            self.last_error = str(exc)
            if channel is not None:
                await channel.close(str(exc))
            return False
        if peer.role != "worker":  # pragma: no cover - handshake already refuses two coordinators
            self.last_error = f"{self.url} is not a worker"
            await channel.close(self.last_error)
            return False
        session = Session(channel, peer=peer, limits=limits, options=options)
        session.start()
        self.attach(session)
        log.info("connected to worker %r at %s (%d samples)", self.name, self.url, self.num_samples)
        return True

    async def close(self, reason: str) -> None:
        if self.session is not None:
            await self.session.close(reason)
