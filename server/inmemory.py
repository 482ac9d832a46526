"""Workers in the coordinator's own process, joined by in-memory channels instead of sockets.

The same session, handshake and round code run as over WebSockets; only the transport differs. Used by the
tests and by simulations of many virtual workers.
"""

from __future__ import annotations

import asyncio

from fedlink.protocol.auth import Keyring
from fedlink.protocol.channel import memory_pair
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import Hello
from fedlink.protocol.connect import open_session
from fedlink.protocol.session import SessionOptions
from fedlink.worker.daemon import WorkerDaemon

from .remote import RemoteWorker

__all__ = ["connect_in_memory"]


async def connect_in_memory(
    daemon: WorkerDaemon,
    *,
    hello: Hello,
    limits: Limits | None = None,
    options: SessionOptions | None = None,
    keyring: Keyring | None = None,
) -> tuple[RemoteWorker, asyncio.Task[None]]:
    """Join ``daemon`` to a new :class:`RemoteWorker`; the task serves the worker side until the session ends.

    The coordinator's side dials (it proves first when both have a ``keyring``), as over a socket.
    """
    limits = limits or daemon.limits
    coordinator_end, worker_end = memory_pair("coordinator", f"memory:{daemon.service.worker_id}")
    served = asyncio.ensure_future(daemon.serve_channel(worker_end))
    session = await open_session(
        coordinator_end, hello, limits=limits, timeout=10, keyring=keyring, initiator=True,
        options=options or SessionOptions(),
    )
    remote = RemoteWorker(f"memory://{daemon.service.worker_id}")
    remote.attach(session)
    return remote, served
