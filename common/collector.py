"""The garbage collector's settings for a long-running daemon that serves many connections.

Python collects its youngest generation every 700 container allocations. A coordinator with a thousand workers
allocates millions of short-lived containers a round (messages, frames, futures), and most collections found
nothing: they walked objects that a moment later would have been freed by reference counting anyway. Collecting
every 20,000 allocations (and the older generations correspondingly less often) took the coordinator's CPU per
round over 1,000 workers from 2.7 s to 1.5 s, of which collections from 0.7-1.1 s to 0-0.3 s (``python
bench/swarm.py``); what cyclic garbage waits longer to be collected is at most a few megabytes.

Only processes call this (``fl-coordinator``'s commands), never library code: it changes the whole process.
"""

from __future__ import annotations

import gc

__all__ = ["DAEMON_THRESHOLDS", "tune_for_daemon"]

DAEMON_THRESHOLDS = (20_000, 20, 20)


def tune_for_daemon() -> None:
    """Collect less often (see the module's docstring); idempotent."""
    gc.set_threshold(*DAEMON_THRESHOLDS)
