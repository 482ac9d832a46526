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

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

__all__ = ["DAEMON_THRESHOLDS", "tune_for_daemon", "freeze_startup", "raise_open_file_limit", "return_free_memory"]

DAEMON_THRESHOLDS = (20_000, 20, 20)


def tune_for_daemon() -> None:
    """Collect less often (see the module's docstring), and allow as many open files as the system lets this
    process have (:func:`raise_open_file_limit`); idempotent."""
    gc.set_threshold(*DAEMON_THRESHOLDS)
    raise_open_file_limit()


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns the (soft, hard) limits now in force.

    Every worker connection is a socket, and every update waiting in a spill file is one more descriptor: the
    usual soft limit of 1,024 would refuse the thousandth worker. The hard limit is the administrator's, and stays.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # some systems cap it below an infinite hard limit
            return (soft, hard)
        soft = hard
    return (soft, hard)


def freeze_startup() -> None:
    """Collect once, then leave everything alive now (modules, schemas, the built model's objects) out of every
    later collection (``gc.freeze``): the oldest generation's collections then walk what the run itself made.

    Called by ``fl-coordinator``'s commands once the coordinator is built. Over 1,000 workers an old-generation
    collection walked some hundred thousand startup objects and took up to 0.5 s of a round (``python
    bench/swarm.py``).
    """
    gc.collect()
    gc.freeze()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def return_free_memory() -> None:
    """Give the memory malloc holds free back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Folding a large update slice by slice allocates and frees many 1-4 MiB buffers (frames, slices) from several
    threads. glibc keeps such freed chunks in each thread's arena for reuse, up to its trim threshold per arena:
    with 8 workers uploading a 400 MB model that was 0.4x the model of resident memory holding nothing. Called once
    per folded large update, it costs a fraction of a millisecond. (Lowering the mmap threshold instead returned the
    memory too, but made every buffer a fresh mapping: rounds took twice as long.)
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
