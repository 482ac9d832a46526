"""A worker as the coordinator sees it: a URL, and a session once connected (whichever side dialled)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from fedlink.protocol.auth import Keyring
from fedlink.protocol.connect import Refused, open_session
from fedlink.protocol.errors import ProtocolError
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.session import Session, SessionOptions
from fedlink.protocol.transport import dial

__all__ = ["RemoteWorker"]

log = logging.getLogger("fedlink.server")


class RemoteWorker:
    """``keyring`` and ``ssl_context`` are what dialling this worker needs: its token and TLS settings."""

    #: The virtual worker that requests sent through this object address, when its session is shared by many (a
    #: simulation host serves many virtual workers on one session); None for a real worker.
    route: str | None = None

    def __init__(self, url: str, *, keyring: Keyring | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.keyring = keyring
        self.ssl_context = ssl_context
        self.session: Session | None = None
        self.hello: Hello | None = None
        self.last_error = ""
        self.last_exception: ProtocolError | None = None  # why the last attempt to connect failed

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

    async def connect(
        self,
        *,
        hello: Hello,
        limits: Limits,
        timeout: float,
        options: SessionOptions,
        admit: Callable[[Hello], None] | None = None,
    ) -> bool:
        """Dial and open a session; on failure remember why (``last_error``) and return False.

        ``admit`` sees the worker's hello before the session starts and raises
        :class:`~fedlink.protocol.connect.Refused` to turn it away (a duplicate id, say).
        """
        if self.connected:
            return True

        def check(peer: Hello) -> None:
            if peer.role != "worker":
                raise Refused("not_a_worker", f"{self.url} answered as a {peer.role}, not a worker")
            if admit is not None:
                admit(peer)

        try:
            channel = await dial(self.url, limits=limits, timeout=timeout, ssl_context=self.ssl_context)
            session = await open_session(
                channel, hello, limits=limits, timeout=timeout, keyring=self.keyring, initiator=True,
                options=options, admit=check,
            )
        except ProtocolError as exc:
            self.last_error, self.last_exception = str(exc), exc
            return False
        self.attach(session)
        log.info("connected to worker %r at %s (%d samples)", self.name, self.url, self.num_samples)
        return True

    async def close(self, reason: str) -> None:
        if self.session is not None:
            await self.session.close(reason)
