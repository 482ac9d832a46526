"""Peer-supplied text is data: make it safe to log or show on a terminal, and names safe to be ids. Pure code.

Anything a peer sends (its error messages, a stranger's malformed hello, a worker's id before it is checked) may
hold terminal escapes that retitle the operator's terminal or draw hyperlinks, carriage returns and newlines that
forge log lines, or bidirectional overrides that reorder what is read. :func:`safe` turns every such character
into a visible escape and cuts the text to a bounded length, so a log line from a peer stays one honest line.

Ids are stricter: a peer id (a worker's ``--id``, a job's name) is restricted at the handshake to
:data:`PEER_ID_PATTERN`, which no terminal, log or rich markup interprets; :func:`to_peer_id` derives such an id
from a free-form name (a shard's file name).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["PEER_ID_PATTERN", "PEER_ID_RULE", "MAX_SHOWN", "safe", "is_peer_id", "to_peer_id"]

#: A peer id: an ASCII letter or digit, then up to 127 letters, digits or ``. _ @ : + -``. No spaces, brackets,
#: quotes, slashes or control characters: nothing a terminal, a log parser or rich markup gives a meaning to.
PEER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$"
#: The rule in words, for error messages.
PEER_ID_RULE = "1 to 128 characters: ASCII letters, digits and . _ @ : + - (starting with a letter or digit)"
#: The most characters of peer-supplied text :func:`safe` keeps.
MAX_SHOWN = 1024

_PEER_ID = re.compile(PEER_ID_PATTERN)
_NOT_ID = re.compile(r"[^A-Za-z0-9._@:+-]+")


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _shown(char: str) -> str:
    # Cc: C0/C1 controls (ESC, CR, LF, BEL, CSI...); Cf: format characters (bidi overrides, zero-width joiners);
    # Zl/Zp: line and paragraph separators; Cs/Co/Cn: surrogates, private use, unassigned. A backslash is doubled
    # so that an escape we write cannot be confused with one the peer wrote.
    if char == "\\":
        return "\\\\"
    if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        return _escape(char)
    return char


def safe(text: object, *, limit: int = MAX_SHOWN) -> str:
    """``text`` (anything: it is ``str()``-ed) with every control, format or separator character escaped, cut
    to ``limit`` characters (marked with ``...``). The result holds no newline and no terminal escape."""
    raw = text if isinstance(text, str) else str(text)
    cut = len(raw) > limit
    shown = "".join(_shown(c) for c in (raw[:limit] if cut else raw))
    return shown + "..." if cut else shown


def is_peer_id(text: str) -> bool:
    """Whether ``text`` is a valid peer id (see :data:`PEER_ID_PATTERN`)."""
    return _PEER_ID.fullmatch(text) is not None


def to_peer_id(name: str, *, fallback: str = "worker") -> str:
    """A valid peer id made from a free-form ``name``: every run of other characters becomes ``-``, leading
    punctuation is dropped, the result is cut to 128 characters; ``fallback`` when nothing is left."""
    candidate = _NOT_ID.sub("-", name).lstrip("._@:+-")[:128].rstrip("-")
    return candidate if candidate and is_peer_id(candidate) else fallback
