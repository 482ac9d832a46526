"""Keys of one secure-aggregation session: X25519 pairs, the session id, HKDF labels, share encryption.

Bonawitz et al., CCS 2017: each worker advertises two public keys, one whose agreements encrypt the Shamir shares
it sends (``c``) and one whose agreements seed the pairwise masks (``s``). Every derived key is
HKDF-SHA256(agreement, salt = session id, info = a label naming the purpose and the ordered pair), so a key never
serves two purposes, two directions or two sessions. The session id binds the round, the parameters, the workers
that advertised and all their public keys: a coordinator that shows different workers different keys or
parameters gives them different session ids, and their shares no longer decrypt.

Shares travel encrypted with ChaCha20-Poly1305 under a fresh random nonce, with (session, round, sender,
recipient) as associated data, so the coordinator that relays them can neither read, alter nor re-address them.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolViolation, ShareDecryptionFailed

__all__ = [
    "KEY_BYTES",
    "KeyPair",
    "session_id",
    "derive",
    "pairwise_seed",
    "share_key",
    "encrypt_share",
    "decrypt_share",
    "public_from_private",
    "agree",
]

KEY_BYTES = 32
NONCE_BYTES = 12
LABEL_MASK = b"fedlink/secagg/v1/pairwise-mask"
LABEL_SHARE = b"fedlink/secagg/v1/share-encryption"
_RAW = serialization.Encoding.Raw


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``private`` is the raw 32 bytes that get Shamir-shared when it is the mask key."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        private = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return cls(private=private, public=key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))

    def agree(self, peer_public: bytes, *, peer: str = "") -> bytes:
        """The X25519 shared secret with ``peer_public``; refuses the all-zero result of a low-order point."""
        return agree(self.private, peer_public, peer=peer)


def agree(private: bytes, peer_public: bytes, *, peer: str = "") -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length or a small-order point (cryptography refuses the zero secret)
        raise ProtocolViolation(f"unusable X25519 public key: {exc}", peer=peer or None) from exc


def public_from_private(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def session_id(*, round: int, params: bytes, keys: Mapping[str, tuple[bytes, bytes]]) -> bytes:
    """SHA-256 over the round, the canonical parameters and every (id, c_public, s_public), ids sorted."""
    digest = hashlib.sha256(b"fedlink/secagg/v1/session")
    digest.update(struct.pack(">Q", round))
    digest.update(_field(params))
    digest.update(struct.pack(">I", len(keys)))
    for worker in sorted(keys):
        c_public, s_public = keys[worker]
        digest.update(_field(worker.encode()) + _field(c_public) + _field(s_public))
    return digest.digest()


def derive(secret: bytes, *, session: bytes, label: bytes, context: Sequence[str] = ()) -> bytes:
    """HKDF-SHA256(secret, salt=session, info=label || length-prefixed context) -> 32 bytes."""
    info = label + b"".join(_field(part.encode()) for part in context)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(secret)


def pairwise_seed(agreement: bytes, *, session: bytes, a: str, b: str) -> bytes:
    """The mask seed both ends of the edge {a, b} derive (ids in sorted order, so both get the same)."""
    low, high = sorted((a, b))
    return derive(agreement, session=session, label=LABEL_MASK, context=(low, high))


def share_key(agreement: bytes, *, session: bytes, sender: str, recipient: str) -> bytes:
    """The key for shares going from ``sender`` to ``recipient`` (the other direction gets another key)."""
    return derive(agreement, session=session, label=LABEL_SHARE, context=(sender, recipient))


def _associated(session: bytes, round: int, sender: str, recipient: str) -> bytes:
    return session + struct.pack(">Q", round) + _field(sender.encode()) + _field(recipient.encode())


def encrypt_share(key: bytes, plaintext: bytes, *, session: bytes, round: int, sender: str, recipient: str) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext) bound to (session, round, sender, recipient)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _associated(session, round, sender, recipient))


def decrypt_share(key: bytes, ciphertext: bytes, *, session: bytes, round: int, sender: str, recipient: str) -> bytes:
    if len(ciphertext) < NONCE_BYTES + 16:
        raise ShareDecryptionFailed(f"a share ciphertext of {len(ciphertext)} bytes is too short", peer=sender)
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, _associated(session, round, sender, recipient))
    except InvalidTag as exc:
        raise ShareDecryptionFailed(
            "the encrypted share does not authenticate: altered, re-addressed or from another session", peer=sender
        ) from exc
