"""Mutual authentication in the handshake: an HMAC-SHA256 challenge-response over both hellos. Pure; no I/O
but reading a token file.

When both hellos say ``auth="hmac-sha256"`` (see :func:`~.session.handshake`), the exchange goes on::

    both sides            AuthChallenge(nonce = 32 fresh random bytes from secrets.token_bytes)
    the side that dialled AuthProof(mac = proof(key, own role, transcript))
    the side that listened checks it, and only then sends its own AuthProof, which the dialler checks

    transcript = "fedlink-auth-v1" | SHA-256(coordinator's hello) | SHA-256(worker's hello)
                 | coordinator's nonce | worker's nonce                         (fixed-size fields, no ambiguity)
    proof      = HMAC-SHA256(key, direction byte | transcript)                  (0x01 coordinator, 0x02 worker)
    key        = HKDF-Extract(salt="fedlink-token-v1", token) = HMAC-SHA256(salt, token)

Why each piece is there:

* **Nonces from both sides**: a proof is only good for one pair of nonces, and each side picks its own at random
  per connection, so a recorded handshake replayed later fails (the victim's nonce is new).
* **The direction byte**: a worker's proof can never pass as a coordinator's, so a peer cannot send back
  (reflect) the proof it was just given.
* **Both hellos, as the exact bytes sent**: a proof covers the identity, role, dataset description and settings
  each side announced; hellos and proofs from different connections cannot be spliced together, and a hello
  changed on the way makes the proof fail on both sides.
* **The dialler proves first**: a listening daemon computes a proof only for a peer that has already proved it
  holds the token, so nobody can use a listener as an oracle that signs transcripts for another connection.
* **The token never travels**, not even hashed, and proofs are compared with :func:`hmac.compare_digest`.
  The key is derived from the token (HKDF-Extract, RFC 5869) so that the token itself is never a MAC key.

What it does not do: protect the session after the handshake. Without TLS, an attacker on the network path can
relay a whole handshake between the real peers and then read or alter the traffic; use ``wss://`` (see
SECURITY.md). A shared token is as strong as its least careful holder: any worker holding it can pose as the
coordinator to the others, so give each worker its own token where that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import CredentialsError

__all__ = [
    "TOKEN_ENV",
    "MIN_TOKEN_BYTES",
    "MIN_TOKEN_BITS",
    "MAX_TOKEN_BYTES",
    "NONCE_BYTES",
    "ADVICE",
    "Secret",
    "Keyring",
    "derive_key",
    "new_nonce",
    "transcript",
    "make_proof",
    "check_proof",
    "secret_from_file",
    "secret_from_env",
    "new_token",
    "token_weakness",
]

log = logging.getLogger("fedlink.protocol.auth")

Role = Literal["worker", "coordinator"]

#: The environment variable ``fl-worker`` reads its token from when no ``--token-file`` is given.
TOKEN_ENV = "FEDLINK_TOKEN"
#: A shorter token is refused (see :func:`token_weakness` for the whole rule).
MIN_TOKEN_BYTES = 32
#: The least estimated strength of a token, in bits: what resists guessing offline from a recorded proof.
MIN_TOKEN_BITS = 128
#: The least Shannon entropy of a token's own characters, in bits per character: repeated letters and short
#: repeated patterns fall below it, while random hex (about 3.5) and base64 (about 5) are far above.
_MIN_SPREAD_BITS = 2.5
_GOOD_TOKEN = "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
#: A token file is read up to this size, so that pointing at a large file by mistake fails fast.
MAX_TOKEN_BYTES = 4096
NONCE_BYTES = 32

_KEY_SALT = b"fedlink-token-v1"
_TRANSCRIPT_LABEL = b"fedlink-auth-v1"
_DIRECTION = {"coordinator": b"\x01", "worker": b"\x02"}

#: What each side's operator does to give it a token; used in the handshake's error messages.
ADVICE: dict[str, str] = {
    "worker": "start the worker with --token-file PATH (or the FEDLINK_TOKEN environment variable)",
    "coordinator": "set auth.token_file in the coordinator's config (or token_file in this worker's entry, "
    "or auth.workers for a worker that dials in)",
}


@dataclass(frozen=True)
class Secret:
    """A key derived from a token, and where the token came from (for messages); never shows the key."""

    key: bytes = field(repr=False)
    origin: str

    def __repr__(self) -> str:
        return f"Secret(from {self.origin})"

    @classmethod
    def from_token(cls, token: bytes, *, origin: str) -> "Secret":
        """Strip surrounding whitespace (a trailing newline from ``echo`` must not matter), check, derive."""
        token = token.strip()
        weakness = token_weakness(token)
        if weakness is not None:
            raise CredentialsError(f"the token from {origin} is too weak: {weakness}; use e.g. the output of {_GOOD_TOKEN}")
        return cls(derive_key(token), origin)


@dataclass(frozen=True)
class Keyring:
    """Which secret authenticates which peer: one ``shared`` secret, and/or one per peer id.

    A peer id listed in ``per_peer`` is only ever checked against its own secret, never against the shared one.
    ``missing`` says what to do when a peer has no secret here; it ends the error message.
    """

    shared: Secret | None = None
    per_peer: Mapping[str, Secret] = field(default_factory=dict)
    missing: str = ""

    def __bool__(self) -> bool:
        return self.shared is not None or bool(self.per_peer)

    def for_peer(self, peer_id: str) -> Secret | None:
        return self.per_peer.get(peer_id, self.shared)


def token_weakness(token: bytes) -> str | None:
    """Why ``token`` (surrounding whitespace already stripped) is too weak to use, or None when it is not.

    The rule, an estimate (a token's real strength is how it was made, which cannot be seen):

    1. at least :data:`MIN_TOKEN_BYTES` (32) bytes;
    2. at least :data:`MIN_TOKEN_BITS` (128) bits by the alphabet estimate: length x log2(size of the character
       classes it uses: 10 digits, 26 lowercase, 26 uppercase, 33 other ASCII, 128 for any non-ASCII byte);
    3. at least 2.5 bits per character of Shannon entropy over its own character frequencies (refuses one letter
       repeated, ``abab...``, and mostly-one-letter tokens);
    4. not mostly a run of consecutive characters (``abcdef...``, ``0123...``), and no 8 characters in a row that
       appear twice (a short pattern repeated).

    Tokens from ``secrets.token_urlsafe(32)`` (43 characters), ``secrets.token_hex(16)`` or ``openssl rand -hex
    16`` and longer pass; a random token fails rules 3-4 with a probability far below one in a million.
    """
    if len(token) < MIN_TOKEN_BYTES:
        return f"{len(token)} bytes long, at least {MIN_TOKEN_BYTES} random ones are needed"
    pool = 0
    for present, size in (
        (any(48 <= b <= 57 for b in token), 10),
        (any(97 <= b <= 122 for b in token), 26),
        (any(65 <= b <= 90 for b in token), 26),
        (any(b < 128 and not (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122) for b in token), 33),
        (any(b >= 128 for b in token), 128),
    ):
        pool += size if present else 0
    if len(token) * math.log2(max(pool, 2)) < MIN_TOKEN_BITS:
        return f"its {len(token)} characters from an alphabet of {pool} give less than {MIN_TOKEN_BITS} bits"
    counts = [token.count(b) for b in set(token)]
    spread = 0.0 - sum(c / len(token) * math.log2(c / len(token)) for c in counts)
    if spread < _MIN_SPREAD_BITS:
        return f"its characters repeat too much ({spread:.1f} bits of entropy per character, at least {_MIN_SPREAD_BITS:g})"
    steps = sum(1 for a, b in zip(token, token[1:]) if b - a in (1, -1))
    if steps * 2 > len(token):
        return "it is mostly a run of consecutive characters"
    seen: set[bytes] = set()
    for start in range(len(token) - 7):
        piece = token[start : start + 8]
        if piece in seen:
            return "it repeats a pattern"
        seen.add(piece)
    return None


def derive_key(token: bytes) -> bytes:
    """HKDF-Extract (RFC 5869) with a fixed salt: the MAC key of a token."""
    return hmac.new(_KEY_SALT, token, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe text (43 characters)."""
    return secrets.token_urlsafe(32)


def transcript(*, coordinator_hello: bytes, worker_hello: bytes, coordinator_nonce: bytes, worker_nonce: bytes) -> bytes:
    """What both proofs cover. Hellos are the exact frame bytes as sent; nonces are :data:`NONCE_BYTES` long."""
    for name, nonce in (("coordinator", coordinator_nonce), ("worker", worker_nonce)):
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"{name} nonce is {len(nonce)} bytes, expected {NONCE_BYTES}")
    return b"".join(
        (
            _TRANSCRIPT_LABEL,
            hashlib.sha256(coordinator_hello).digest(),
            hashlib.sha256(worker_hello).digest(),
            coordinator_nonce,
            worker_nonce,
        )
    )


def make_proof(secret: Secret, prover: Role, transcript_bytes: bytes) -> bytes:
    """The MAC that shows the ``prover`` side holds ``secret`` in the connection ``transcript_bytes`` describes."""
    return hmac.new(secret.key, _DIRECTION[prover] + transcript_bytes, hashlib.sha256).digest()


def check_proof(secret: Secret, prover: Role, transcript_bytes: bytes, mac: bytes) -> bool:
    """Whether ``mac`` is the ``prover``'s proof; constant time in the contents of ``mac``."""
    return hmac.compare_digest(make_proof(secret, prover, transcript_bytes), mac)


def secret_from_file(path: Path) -> Secret:
    """Read a token file (at most :data:`MAX_TOKEN_BYTES`).

    Raises :class:`CredentialsError` naming the file when it is missing, unreadable, weak, or open to other users
    (any group or other permission bit: others could read it, or replace it), with the ``chmod`` to run.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            token = file.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise CredentialsError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise CredentialsError(f"token file {path} is not a regular file")
    if len(token) > MAX_TOKEN_BYTES:
        raise CredentialsError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes; is it the right file?")
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            f"token file {path} is open to other users (mode {mode & 0o777:o}): they could read or replace it; "
            f"run `chmod 600 {path}`"
        )
    return Secret.from_token(token, origin=f"token file {path}")


def secret_from_env(environ: Mapping[str, str] | None = None, name: str = TOKEN_ENV) -> Secret | None:
    """The secret in ``$FEDLINK_TOKEN``, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(name, "")
    if not value.strip():
        return None
    return Secret.from_token(value.encode(), origin=f"${name}")
