"""What a worker daemon tells an observer (the Prometheus exporter); the base class ignores everything.

The daemon holds one :class:`DaemonEvents` (``WorkerDaemon.events``) and calls it at the few points where a
connection or a job changes state, so that monitoring never reaches into the daemon's private attributes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fedlink.errors import FedlinkError

if TYPE_CHECKING:
    from fedlink.protocol.errors import ProtocolError
    from fedlink.protocol.session import Inbound, Session

__all__ = ["DaemonEvents", "REFUSAL_CODES", "observe_requests"]

# Error codes that mean "refused before any work": the request never became a job.
REFUSAL_CODES = frozenset({"busy", "model_not_allowed", "bad_request", "policy", "policy_refused"})
_JOBS = frozenset({"train", "evaluate", "stage"})

Handler = Callable[["Session", "Inbound"], Awaitable[None]]


class DaemonEvents:
    """Events of a worker daemon. Every method must return quickly and never raise."""

    def session_opened(self, session: "Session") -> None:
        """A coordinator finished the handshake; its session's counters count from now on."""

    def session_closed(self, session: "Session", reason: str) -> None:
        """That coordinator's session ended (``reason`` as the session reports it)."""

    def handshake_refused(self, peer: str, error: "ProtocolError") -> None:
        """A connection failed its handshake (an ``AuthenticationFailed`` is a failed token proof)."""

    def request_refused(self, code: str) -> None:
        """A request was refused before any work: ``code`` is the error's stable code (``busy``, ...)."""

    def job_started(self, kind: str) -> None:
        """A ``train`` or ``evaluate`` job starts."""

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None:
        """The request ended: ``outcome`` is ``ok``, ``failed`` or ``refused`` (then request_refused came first)."""


def observe_requests(handler: Handler, events: DaemonEvents) -> Handler:
    """``handler`` (the daemon's request handler) reporting each request to ``events`` as a job or a refusal."""

    async def observed(session: "Session", inbound: "Inbound") -> None:
        kind = str(getattr(inbound.message, "type", ""))
        if kind not in _JOBS:
            await handler(session, inbound)
            return
        started = time.perf_counter()
        events.job_started(kind)
        outcome = "failed"
        try:
            await handler(session, inbound)
            outcome = "ok"
        except FedlinkError as exc:
            code = getattr(exc, "code", "")
            if code in REFUSAL_CODES:
                outcome = "refused"
                events.request_refused(str(code))
            raise
        finally:
            events.job_finished(kind, outcome, time.perf_counter() - started)

    return observed
