"""A simulation host inside a Ray actor: the same :class:`~fedlink.worker.virtual_host.VirtualHost`, on its own
event loop in a thread of the actor, listening on the node's address.

Ray carries only the start line (JSON text) and the URL back; model states and results travel over fedlink's
own session to the coordinator, never through Ray's object store or its pickling. The actor lives for the whole
run (virtual workers keep their memory on it) and is killed by the coordinator at the end.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

__all__ = ["HostActor"]


class HostActor:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, line: str) -> str:
        """Start the host from its start line (``{"spec": ..., "token": ...}``); returns the URL it listens on."""
        import ray as ray_module

        from fedlink.worker.virtual_host import HostSpec, VirtualHost, configure_process, keyring_for

        given = json.loads(line)
        spec = HostSpec.model_validate(given["spec"])
        configure_process(spec)
        ray: Any = ray_module
        address = str(ray.util.get_node_ip_address())
        loop = asyncio.new_event_loop()

        async def serve() -> str:
            host = VirtualHost(spec, keyring=keyring_for(str(given["token"])))
            return await host.start(host=address, port=0)

        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fedlink-host", daemon=True)
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=120)

    def ping(self) -> str:
        return "ok"
